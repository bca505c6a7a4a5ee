"""Tabs of one browser share a session (its cookie) without ending each other's: the session
lasts until its last page has gone for the grace period, and a run whose page went away runs
on while another page of its session is open. The clock is moved by hand."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

pytest.importorskip("gradio")

from c2c_core.frontends.ui import guard, sessions  # noqa: E402
from c2c_core.frontends.ui.sessions import Pages  # noqa: E402


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Req:
    """What a handler gets: the page's session hash and the browser's cookie."""

    def __init__(self, page, cookie):
        self.session_hash = page
        self.cookies = {guard.SESSION_COOKIE: cookie}


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def pages(clock):
    return Pages(grace=lambda: 30.0, clock=clock)


def test_a_session_outlives_a_closed_tab_while_another_is_open(pages, clock):
    pages.arrive("s", "tab-a")
    pages.arrive("s", "tab-b")
    pages.leave("s", "tab-b")
    clock.t += 3600
    assert pages.pages("s") == {"tab-a"} and pages.expired() == []
    pages.leave("s", "tab-a")
    clock.t += 29.9
    assert pages.expired() == [] and pages.known("s")
    clock.t += 0.1
    assert pages.expired() == ["s"] and not pages.known("s")
    assert pages.expired() == []  # said once


def test_a_reload_within_the_grace_keeps_the_session(pages, clock):
    pages.arrive("s", "old")
    pages.leave("s", "old")
    clock.t += 5
    pages.arrive("s", "new")  # the reloaded page: a new session hash, the same cookie
    clock.t += 3600
    assert pages.expired() == [] and pages.pages("s") == {"new"}


def test_a_reconnected_heartbeat_is_one_page(pages, clock):
    pages.arrive("s", "a")
    pages.arrive("s", "a")  # the page's heartbeat reconnects before the old stream ends
    pages.leave("s", "a")
    clock.t += 3600
    assert pages.pages("s") == {"a"} and pages.expired() == []
    pages.leave("s", "a")
    pages.leave("s", "a")  # one leave too many changes nothing
    clock.t += 30
    assert pages.expired() == ["s"]


def test_sessions_are_counted_apart(pages, clock):
    pages.arrive("s", "a")
    pages.arrive("t", "a")  # another browser naming the same hash owns nothing of s
    pages.leave("t", "a")
    clock.t += 30
    assert pages.expired() == ["t"] and pages.pages("s") == {"a"}


def test_a_run_whose_page_went_runs_on_until_the_session_ends(pages, clock, monkeypatch):
    monkeypatch.setattr(sessions, "PAGES", pages)
    cookie = guard.mint_session()
    a, b = Req("tab-a", cookie), Req("tab-b", cookie)
    key = sessions.session_id(a)
    path = sessions.new_run_path(a, "batch")
    open(path, "w").write('{"id": 1}\n')
    pages.arrive(key, "tab-a")
    pages.arrive(key, "tab-b")
    ev = sessions.stop_flag(b)
    pages.leave(key, "tab-b")
    assert sessions.page_gone(b, ev, done=lambda: False)  # tab A is still open
    sessions.clear_stop(b, ev)  # tab B's own cleanup leaves the orphaned run's flag
    assert not ev.is_set() and [n for _, n in sessions.session_runs(a)] == [
        os.path.basename(path)]
    pages.leave(key, "tab-a")
    clock.t += 29
    assert sessions.end_expired(pages) == [] and not ev.is_set() and os.path.exists(path)
    clock.t += 1
    assert sessions.end_expired(pages) == [key]
    assert ev.is_set() and not os.path.exists(path)


def test_stop_in_another_tab_reaches_an_orphaned_run(pages, monkeypatch):
    monkeypatch.setattr(sessions, "PAGES", pages)
    cookie = guard.mint_session()
    a, b = Req("tab-a", cookie), Req("tab-b", cookie)
    pages.arrive(sessions.session_id(a), "tab-a")
    ev = sessions.stop_flag(b)
    assert sessions.page_gone(b, ev, done=ev.is_set)  # (its run ends once stopped)
    sessions.clear_stop(b, ev)
    assert sessions.request_stop(a) and ev.is_set()
    done = [False]
    ev2 = sessions.stop_flag(b)
    sessions.page_gone(b, ev2, done=lambda: done[0])
    sessions.clear_stop(b, ev2)
    done[0] = True  # the run ended by itself: Stop finds nothing left to stop
    sessions.clear_stop(a, threading.Event())
    assert not sessions.request_stop(a)


def test_a_run_of_a_session_without_pages_stops_when_its_client_goes(pages, monkeypatch):
    """An API client (no page, no heartbeat) that goes away: its run stops at once."""
    monkeypatch.setattr(sessions, "PAGES", pages)
    req = Req("api", guard.mint_session())
    ev = sessions.stop_flag(req)
    assert not sessions.page_gone(req, ev, done=lambda: False) and ev.is_set()
    sessions.clear_stop(req, ev)


def test_a_run_stops_when_its_own_page_was_the_only_one(pages, clock, monkeypatch):
    """A client with a heartbeat (a page, or gradio_client, which holds one too) that is killed:
    its heartbeat closes a moment before its run's stream. Its own leaving never keeps its run
    going; another page that left within the grace period (reloading) does."""
    monkeypatch.setattr(sessions, "PAGES", pages)
    cookie = guard.mint_session()
    a, b = Req("tab-a", cookie), Req("tab-b", cookie)
    key = sessions.session_id(a)
    pages.arrive(key, "tab-b")
    ev = sessions.stop_flag(b)
    pages.leave(key, "tab-b")  # its heartbeat went first
    assert pages.known(key)  # the session itself lives on for the grace period
    assert not sessions.page_gone(b, ev, done=lambda: False) and ev.is_set()
    sessions.clear_stop(b, ev)
    # tab A (reloading) left a second before tab B's run lost its page: B's run goes on
    pages.arrive(key, "tab-a")
    pages.arrive(key, "tab-b")
    ev2 = sessions.stop_flag(b)
    pages.leave(key, "tab-b")
    pages.leave(key, "tab-a")
    clock.t += 1
    assert sessions.page_gone(b, ev2, done=lambda: False) and not ev2.is_set()
    sessions.clear_stop(b, ev2)
    clock.t += 30
    assert sessions.end_expired(pages) == [key] and ev2.is_set()


def test_heartbeat_streams_are_counted_per_cookie(pages, clock):
    """The middleware counts a page from its heartbeat's opening to its end, under the cookie
    that holds it; other routes and cookie-less requests are not pages."""
    opened, release = asyncio.Event(), asyncio.Event()

    async def app(scope, receive, send):  # an open heartbeat stream until released
        if scope["path"] == "/gradio_api/heartbeat/tab-a":
            opened.set()
            await release.wait()

    mw = sessions.PageConnections(app, pages)
    cookie = guard.mint_session()
    key = guard.session_key(cookie)

    def scope(path, cookie_value=cookie):
        headers = [(b"cookie", f"{guard.SESSION_COOKIE}={cookie_value}".encode())]
        return {"type": "http", "method": "GET", "path": path, "headers": headers}

    async def main():
        task = asyncio.create_task(mw(scope("/gradio_api/heartbeat/tab-a"), None, None))
        await opened.wait()
        assert pages.pages(key) == {"tab-a"}
        await mw(scope("/gradio_api/info"), None, None)
        await mw(scope("/gradio_api/heartbeat/x", "forged.sig"), None, None)
        assert pages.pages(key) == {"tab-a"} and pages.pages("forged") == set()
        release.set()
        await task
        assert pages.pages(key) == set() and pages.known(key)

    grace = pages.grace
    pages.grace = lambda: 3600.0  # the middleware's timer must not fire during the test
    try:
        asyncio.run(main())
    finally:
        pages.grace = grace
    clock.t += 30
    assert pages.expired() == [key]
