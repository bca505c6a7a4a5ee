"""`serve` on the real scheduler (continuous batching on the tiny pair): the official `openai`
client streams completions and chats in every mode, concurrently, and each answer's text is
its batch-1 generation's; usage counts and the `c2c` timing object come with it."""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import replace

import pytest

from c2c_core.bench.serving import Scheduler
from c2c_core.engines import fast
from c2c_core.io.prompts import PromptItem
from c2c_core.measure.timing import Timer

from conftest import HANG_S, loud_weights

openai = pytest.importorskip("openai")

PROMPTS = ["What is the capital of France?", "Say hello.", "What is 25 * 17?",
           "Write a haiku about coding."]


@pytest.fixture(scope="module")
def served(tiny_cfg_kwargs):
    from c2c_core.frontends.serve import start_server
    from c2c_core.models.loading import load_pipeline
    from c2c_core.spec.config import build_run_config
    cfg = build_run_config(**{**tiny_cfg_kwargs, "max_new_tokens": 6}, engine="fast",
                           ignore_eos=True)
    pipe = load_pipeline(cfg)
    loud_weights(pipe)
    fast.engine_for(pipe, compile=False)
    sched = Scheduler(pipe, cfg, slots=3, max_queue=32, max_prompt_tokens=96).start()
    handle = start_server(sched, host="127.0.0.1", port=0)
    try:
        yield pipe, cfg, sched, handle.url
    finally:
        handle.close()
        sched.close()


def _expected(pipe, cfg, prompt, mode, n):
    c = replace(cfg, gen=replace(cfg.gen, max_new_tokens=n))
    g = fast.generate_batch(pipe, c, [PromptItem(1, prompt)], mode, Timer(pipe.device))[0]
    tok = pipe.sharers[0].tokenizer if mode == "sharer" else pipe.tokenizer
    return tok.decode(g.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False), \
        len(g.tokens)


def test_openai_client_streams_every_mode_concurrently(served):
    pipe, cfg, sched, url = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                           timeout=HANG_S)
    assert sorted(m.id for m in client.models.list().data) == sorted(sched.modes)
    jobs = [(m, p) for m in sched.modes for p in PROMPTS[:2]]

    def one(job):
        mode, prompt = job
        text, usage, c2c = "", None, None
        stream = client.completions.create(model=mode, prompt=prompt, max_tokens=5,
                                           stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text or ""
            if getattr(chunk, "usage", None):
                usage = chunk.usage
                c2c = (chunk.model_extra or {}).get("c2c")
        return text, usage, c2c

    with cf.ThreadPoolExecutor(len(jobs)) as ex:  # all at once: they share the decode batch
        results = list(ex.map(one, jobs))
    for (mode, prompt), (text, usage, c2c) in zip(jobs, results):
        want, n = _expected(pipe, cfg, prompt, mode, 5)
        assert usage.completion_tokens == n
        assert text == want.rstrip("\ufffd"), (mode, prompt)
        assert c2c["mode"] == mode and c2c["ttft_ms"] >= c2c["queue_ms"] >= 0
        if mode == "c2c":
            assert c2c["stages"]["projector_total_ms"] > 0


def test_openai_chat_and_errors(served):
    pipe, cfg, sched, url = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                           timeout=HANG_S)
    r = client.chat.completions.create(model="c2c", max_tokens=4,
                                       messages=[{"role": "user", "content": PROMPTS[2]}])
    assert r.choices[0].message.content == _expected(pipe, cfg, PROMPTS[2], "c2c", 4)[0]
    assert r.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError, match="not served"):
        client.completions.create(model="gpt-4o", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="receiver", prompt="Hi", max_tokens=500)
