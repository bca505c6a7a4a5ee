"""See the plan (issue 18 item 5): `python -m c2c_core align` and the Profile tab's token
alignment table, both from tokenizers alone.

- `align --json` on smollm2+gemma3-demo equals plan_sections called directly (equal-length
  lists); the plain table has one row per position and ends with the summary line;
- bad input (empty prompt, unknown preset, --alignment none for a different-tokenizer pair) is
  one sentence and exit 2;
- the same-tokenizer pair (smollm2-demo) shows the same-tokenizer plan, and its Profile table is
  hidden;
- several sharers that pad differently share one grid (plan_view, pure).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from c2c_core.frontends import cli
from c2c_core.models.loading import load_tokenizer
from c2c_core.plan.sections import plan_sections
from c2c_core.plan.show import plan_view, summary_line, table_rows, to_json
from c2c_core.spec.config import ModelSpec

PROMPT = "What is 25 * 17? Answer in Japanese: 答え 😀"
PAIR = "smollm2+gemma3-demo"
SUMMARY = re.compile(r"^(\d+) receiver positions, (\d+) projected, pads: receiver (\d+),"
                     r" gemma3 (\d+)$")


@pytest.fixture(scope="module")
def toks():
    return {n: load_tokenizer(ModelSpec(n))[0] for n in ("smollm2", "gemma3")}


def align(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["align", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("strategy", ["first", "longest"])
def test_json_equals_plan_sections(capsys, toks, strategy):
    code, out, _ = align(capsys, "--preset", PAIR, "--prompt", PROMPT, "--alignment", strategy,
                         "--json")
    assert code == 0
    assert len(out.strip().splitlines()) == 1  # one JSON object
    got = json.loads(out)
    want = plan_sections(toks["smollm2"], toks["gemma3"], PROMPT, strategy,
                         receiver_name="smollm2", sharer_name="gemma3")
    n = len(want.receiver_ids)
    assert got["strategy"] == strategy and got["sharers"] == ["gemma3"]
    assert got["receiver_ids"] == list(want.receiver_ids)
    assert got["sharer_ids"] == [list(want.sharer_ids)]
    assert got["projection_mask"] == [list(want.projection_mask)]
    assert got["receiver_pad_mask"] == list(want.receiver_pad_mask)
    assert got["sharer_pad_mask"] == [list(want.sharer_pad_mask)]
    assert all(len(x) == n for x in [got["receiver_ids"], *got["sharer_ids"],
                                     *got["projection_mask"]])
    assert [[s["kind"], s["start"], s["end"]] for s in got["sections"][0]] == [
        [s.kind, s.start, s.end] for s in want.sections]
    assert any(got["projection_mask"][0]) and not all(got["projection_mask"][0])


def test_plain_table_and_summary_line(capsys, toks):
    code, out, _ = align(capsys, "--preset", PAIR, "--prompt", PROMPT)
    assert code == 0
    lines = out.rstrip("\n").splitlines()
    m = SUMMARY.match(lines[-1])
    assert m, lines[-1]
    want = plan_sections(toks["smollm2"], toks["gemma3"], PROMPT, "first",
                         receiver_name="smollm2", sharer_name="gemma3")
    n, projected, r_pads, s_pads = map(int, m.groups())
    assert (n, projected) == (len(want.receiver_ids), want.projected)
    assert (r_pads, s_pads) == (sum(want.receiver_pad_mask), sum(want.sharer_pad_mask))
    assert lines[0].split()[:3] == ["position", "section", "receiver"]
    assert len(lines) == 1 + n + 1  # header, one row per position, summary
    assert sum(" yes" in row for row in lines[1:-1]) == projected
    assert '"<end_of_turn>"' in out and '"\\n"' in out  # token texts escaped, one line each


@pytest.mark.parametrize("argv, says", [
    (["--preset", PAIR, "--prompt", "   "], "--prompt is empty"),
    (["--preset", PAIR, "--prompt", ""], "--prompt is empty"),
    (["--preset", "no-such-preset", "--prompt", "hi"], "Unknown preset 'no-such-preset'"),
    (["--preset", PAIR, "--prompt", "hi", "--alignment", "none"],
     "has its own tokenizer and --alignment none"),
])
def test_bad_input_is_one_sentence_exit_2(capsys, argv, says):
    code, out, err = align(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and says in err and err.startswith("error: ")


# slow: a subprocess loading the real tokenizer (~20 s under load);
# quick: the in-process align tests here, test_cli's test_module_entry_point_runs
@pytest.mark.slow
def test_same_tokenizer_pair_from_the_command_line():
    """As a new user types it: the module entry point, offline, the same-tokenizer plan."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "c2c_core", "align", "--preset", "smollm2-demo",
                        "--prompt", "Hi there", "--alignment", "none"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.rstrip("\n").splitlines()
    m = re.match(r"^(\d+) receiver positions, (\d+) projected, pads: receiver 0, smollm2 0$",
                 lines[-1])
    assert m, lines[-1]
    n, projected = map(int, m.groups())
    assert projected == n - 1  # every position but the last, as today
    assert "receiver's tokenizer" in lines[-2]
    assert "Traceback" not in p.stderr


def test_two_sharers_that_pad_differently_share_one_grid(toks):
    """Gemma receiver: a SmolLM2 sharer pads the receiver's (shorter) template, a Gemma sharer
    (same tokenizer) does not; the grid has the padded length and the Gemma sharer is absent
    at those pads, projecting nothing there."""
    view = plan_view(toks["gemma3"], [toks["smollm2"], toks["gemma3"]], PROMPT, "first",
                     receiver_name="gemma3", sharer_names=["smollm2", "gemma3"])
    cross, same = view.plans
    assert view.same_tokenizer == (False, True)
    assert any(cross.receiver_pad_mask) and not any(same.receiver_pad_mask)
    n = len(view.where)
    # the receiver's trailing padding is cut, as the engines cut it; the last position is read
    # after the projection, so it is never projected
    L = max(i for i, pad in enumerate(cross.receiver_pad_mask) if not pad) + 1
    assert n == L
    assert view.sharer_ids(0) == list(cross.sharer_ids[:L])
    assert view.projection_mask(0) == list(cross.projection_mask[:L - 1]) + [False]
    ids = view.sharer_ids(1)
    assert [i for i in ids if i is not None] == list(same.sharer_ids)
    assert [i is None for i in ids] == list(cross.receiver_pad_mask[:L])
    assert not any(p for p, i in zip(view.projection_mask(1), ids) if i is None)
    assert sum(view.projection_mask(1)) == same.projected
    rows = table_rows(view)
    assert len(rows) == n and all(len(r) == 4 + 3 * 2 for r in rows)
    assert {r[7] for r, pad in zip(rows, cross.receiver_pad_mask[:L]) if pad} == {"-"}
    data = to_json(view)
    assert all(len(x) == n for x in [data["receiver_ids"], *data["sharer_ids"],
                                     *data["projection_mask"]])
    assert summary_line(view).startswith(f"{n} receiver positions, ")


def test_profile_alignment_table(toks):
    from c2c_core.frontends.ui.profile_tab import alignment_table, show_alignment
    frame, summary = alignment_table(PROMPT, preset=PAIR)
    want = plan_sections(toks["smollm2"], toks["gemma3"], PROMPT, "first",
                         receiver_name="smollm2", sharer_name="gemma3")
    assert len(frame) == len(want.receiver_ids)  # one row per receiver position
    assert list(frame.columns) == ["position", "section", "receiver", "receiver id", "sharer",
                                   "sharer id", "projected"]
    assert list(frame["receiver id"]) == [str(i) for i in want.receiver_ids]
    assert (frame["projected"] == "yes").sum() == want.projected
    assert SUMMARY.match(summary.split(" (")[0])
    box, note, table = show_alignment(PROMPT, preset=PAIR)
    assert box.visible is True and len(table) == len(frame)
    assert "gemma3" in note


def test_profile_alignment_hidden_for_same_tokenizer_and_bad_settings():
    from c2c_core.frontends.ui.profile_tab import alignment_table, show_alignment
    assert alignment_table("What is 25 * 17?", preset="smollm2-demo") is None
    for kw in ({"preset": "smollm2-demo"}, {"preset": "no-such-preset"},
               {"preset": PAIR, "receiver": "/etc/passwd"}):
        box, _, table = show_alignment("What is 25 * 17?", **kw)
        assert box.visible is False and table.empty
    box, _, _ = show_alignment("", preset=PAIR)
    assert box.visible is False
