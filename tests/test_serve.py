"""The serving engine and its HTTP app on the real SmolLM2-135M (in-process, no sockets).

- batching: requests of different lengths, with and without the edit, decoded together give
  exactly the greedy tokens of ``patch_model`` + ``generate(do_sample=False)`` on each prompt
  alone; every decode step is one forward over all active rows; late requests join a running
  batch; merged mode equals the runtime path and restores the weights on shutdown;
- sampling: seeded sampling is reproducible, a tiny ``top_p`` is greedy; stop strings cut the
  text and are never streamed, even partially;
- robustness: malformed JSON, missing fields, unknown model, bad parameters, oversize prompts
  and ``max_tokens`` get a 4xx OpenAI error body; a full queue gets 503; an exception in one
  request's processing (prefill, sampling, a batched forward) fails only the requests involved
  and the engine keeps serving.

Disconnects need real sockets: they are in ``test_serve_openai.py``. A random delta on the
middle layer (|S| 256, r 8, magnitude 0.5) changes the greedy answer of two of the prompts.
"""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install edit_runtime[serve])")

from delta_helpers import random_delta  # noqa: E402
from edit_runtime.arch import find_decoder_layers  # noqa: E402
from edit_runtime.data import render_chat  # noqa: E402
from edit_runtime.patch import patch_model, patched_modules  # noqa: E402
from edit_runtime.serve.engine import (  # noqa: E402
    EngineConfig,
    Failed,
    Finished,
    QueueFullError,
    SamplingParams,
    ServingEngine,
    TextDelta,
    UnknownModelError,
    _QueueSink,
    _safe_length,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]



PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Hi"]
RAW = "The capital of France is"  # a raw completion prompt
N = 8  # greedy reference length; requests ask for at most N tokens
BASE = "smollm2"
LIMITS = dict(max_batch_size=8, max_queue=8, max_model_len=256, max_tokens_limit=32)


# ---------------------------------------------------------------------------------------- helpers
def chat_ids(tok, text: str) -> list[int]:
    return tok(render_chat(tok, text), add_special_tokens=False)["input_ids"]


@torch.no_grad()
def greedy(model, ids: list[int], n: int = N) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def expected(tok, ref: list[int], max_tokens: int, eos: frozenset[int]) -> tuple[list[int], str, str]:
    """(tokens, text, finish_reason) the server must give for a greedy reference."""
    toks = ref[:max_tokens]
    for i, t in enumerate(toks):
        if t in eos:
            return toks[:i + 1], tok.decode(toks[:i + 1], skip_special_tokens=True), "stop"
    return toks, tok.decode(toks, skip_special_tokens=True), "length"


def collect(sink: _QueueSink, timeout: float = 120.0) -> tuple[list[str], Finished | Failed]:
    pieces = []
    while True:
        ev = sink.queue.get(timeout=timeout)
        if isinstance(ev, TextDelta):
            pieces.append(ev.text)
        else:
            return pieces, ev


@pytest.fixture(scope="module")
def setup(smollm2):
    """(model, tok, delta, refs) with refs[(prompt, edited)] = greedy token ids of N tokens (chat
    template; RAW: the raw prompt with the tokenizer's special tokens, base model only)."""
    model, tok = smollm2
    assert not patched_modules(model)
    layer = len(find_decoder_layers(model)[1]) // 2
    delta = random_delta(model, layer, m=256, r=8, magnitude=0.5, seed=3)
    refs = {(p, False): greedy(model, chat_ids(tok, p)) for p in PROMPTS}
    refs[(RAW, False)] = greedy(model, tok(RAW)["input_ids"])
    with patch_model(model, delta):
        refs.update({(p, True): greedy(model, chat_ids(tok, p)) for p in PROMPTS})
    assert not patched_modules(model)
    assert sum(refs[(p, True)] != refs[(p, False)] for p in PROMPTS) >= 2, "the edit should change greedy output"
    yield model, tok, delta, refs
    assert not patched_modules(model), "a test left a patch on the shared model"


@pytest.fixture
def make_engine(setup):
    """Builds engines on the shared model (one at a time) and shuts them down after the test."""
    model, tok, delta, _ = setup
    made: list[ServingEngine] = []

    def make(start: bool = True, deltas=None, gates=None, **overrides) -> ServingEngine:
        for e in made:
            e.shutdown()
        eng = ServingEngine(model, tok, {"safety": delta} if deltas is None else deltas,
                            config=EngineConfig(**{**LIMITS, **overrides}), served_name=BASE, gates=gates)
        made.append(eng)
        return eng.start() if start else eng

    yield make
    for e in made:
        e.shutdown()
    assert not patched_modules(model)


def forward_recorder(model):
    """Records the input_ids shape of every model forward; returns (shapes, hook handle)."""
    shapes: list[tuple[int, int]] = []

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        shapes.append(tuple(ids.shape))

    return shapes, model.register_forward_pre_hook(hook, with_kwargs=True)


# --------------------------------------------------------------------------------------- batching
def test_mixed_batch_equals_generate_one_forward_per_step(setup, make_engine):
    model, tok, _, refs = setup
    eng = make_engine(start=False)
    jobs = []
    for p in PROMPTS:
        for edited in (False, True):
            sink = _QueueSink()
            eng.submit(chat_ids(tok, p), SamplingParams(max_tokens=N, temperature=0), sink,
                       model=f"{BASE}+safety" if edited else BASE)
            jobs.append((p, edited, sink))
    shapes, hook = forward_recorder(model)
    try:
        eng.start()
        results = [(p, edited, *collect(sink)) for p, edited, sink in jobs]
    finally:
        hook.remove()
    for p, edited, pieces, ev in results:
        assert isinstance(ev, Finished), ev
        toks, text, finish = expected(tok, refs[(p, edited)], N, eng.eos_ids)
        assert list(ev.token_ids) == toks, (p, edited)
        assert ev.text == text and "".join(pieces) == text and ev.finish_reason == finish
        assert ev.prompt_tokens == len(chat_ids(tok, p)) and ev.completion_tokens == len(toks)
    # One prefill forward of the six (right-padded) prompts, then decode forwards of (B, 1): the
    # first one carries all six sequences, and there is exactly one forward per decode step.
    prefill = [s for s in shapes if s[1] > 1]
    decode = [s for s in shapes if s[1] == 1]
    assert prefill == [(6, max(len(chat_ids(tok, p)) for p in PROMPTS))]
    assert decode[0] == (6, 1)
    stats = eng.stats()
    assert stats["steps"]["decode"] == len(decode) and stats["batch_size"]["count"] == len(decode)
    assert stats["tokens"]["completion"] == sum(ev.completion_tokens for *_, ev in results)


def test_late_requests_join_the_running_batch(setup, make_engine):
    model, tok, _, refs = setup
    eng = make_engine()
    first = _QueueSink()
    eng.submit(chat_ids(tok, PROMPTS[1]), SamplingParams(max_tokens=N, temperature=0), first,
               model=f"{BASE}+safety")
    shapes, hook = forward_recorder(model)
    try:
        head = first.queue.get(timeout=60)     # the first sequence is decoding now
        assert isinstance(head, TextDelta)
        late = []
        for p, edited in ((PROMPTS[0], False), (PROMPTS[2], True)):
            sink = _QueueSink()
            eng.submit(chat_ids(tok, p), SamplingParams(max_tokens=4, temperature=0), sink,
                       model=f"{BASE}+safety" if edited else BASE)
            late.append((p, edited, sink))
        pieces, ev = collect(first)
        late_results = [(p, e, *collect(s)) for p, e, s in late]
    finally:
        hook.remove()
    toks, text, _ = expected(tok, refs[(PROMPTS[1], True)], N, eng.eos_ids)
    assert list(ev.token_ids) == toks and head.text + "".join(pieces) == text
    for p, edited, _, ev2 in late_results:
        assert list(ev2.token_ids) == expected(tok, refs[(p, edited)], 4, eng.eos_ids)[0]
    assert max(s[0] for s in shapes if s[1] == 1) >= 2, "late requests should share decode steps"


def test_merged_mode_equals_runtime_and_restores_weights(setup, make_engine):
    model, tok, delta, refs = setup
    path = delta.edits[0].module
    before = model.get_submodule(path).weight.detach().clone()
    eng = make_engine(merged=True)
    assert eng.model_names == [f"{BASE}+safety"]
    with pytest.raises(UnknownModelError):
        eng.resolve_model(BASE)
    for p in PROMPTS[1:]:
        out = eng.generate(chat_ids(tok, p), SamplingParams(max_tokens=N, temperature=0), model=f"{BASE}+safety")
        assert list(out.token_ids) == expected(tok, refs[(p, True)], N, eng.eos_ids)[0]
    eng.shutdown()
    assert not patched_modules(model) and torch.equal(model.get_submodule(path).weight, before)
    with pytest.raises(ValueError, match="exactly one delta"):
        ServingEngine(model, tok, {}, config=EngineConfig(merged=True))


def test_gated_delta_is_base_or_edited_per_request(setup, make_engine):
    """A delta served with a probe gate: a request for it gets the edited model's greedy tokens
    where the probe fires on its prompt and the base model's elsewhere, while sharing the batch
    with a plain base request; the decisions are counted; bad gates are refused unpatched."""
    from edit_runtime.gate import GateError, ProbeGate, last_token_hidden
    from edit_runtime.serve.app import render_prometheus

    model, tok, delta, refs = setup
    gate_layer = 2
    h = last_token_hidden(model, tok, PROMPTS, [gate_layer])[gate_layer].double()
    fires = [True, False, True]
    # discriminating: the gated-off prompt's edited answer differs from its base one, and so does
    # a gated-on prompt's
    assert refs[(PROMPTS[1], True)] != refs[(PROMPTS[1], False)]
    assert any(refs[(p, True)] != refs[(p, False)] for p, f in zip(PROMPTS, fires) if f)
    w = torch.linalg.pinv(h) @ torch.tensor([1.0 if f else -1.0 for f in fires], dtype=torch.float64)
    gate = ProbeGate(gate_layer, w.float(), 0.0, 0.0)
    eng = make_engine(start=False, gates={"safety": gate})
    jobs = []
    for p, model_name in [(p, f"{BASE}+safety") for p in PROMPTS] + [(PROMPTS[0], BASE)]:
        sink = _QueueSink()
        eng.submit(chat_ids(tok, p), SamplingParams(max_tokens=N, temperature=0), sink, model=model_name)
        jobs.append((p, model_name, sink))
    eng.start()
    for p, model_name, sink in jobs:
        _, ev = collect(sink)
        assert isinstance(ev, Finished), ev
        edited = model_name.endswith("+safety") and fires[PROMPTS.index(p)]
        assert list(ev.token_ids) == expected(tok, refs[(p, edited)], N, eng.eos_ids)[0], (p, model_name)
    stats = eng.stats()
    assert stats["gate"] == {"safety": {"on": 2, "off": 1, "layer": gate_layer, "threshold": 0.0}}
    text = render_prometheus(stats, {"requests": [], "latency_s": {}})
    assert 'edit_runtime_gate_decisions_total{delta="safety",decision="on"} 2' in text
    eng.shutdown()
    assert not patched_modules(model)
    assert not model._forward_pre_hooks and not any(m._forward_hooks for m in model.model.layers)
    with pytest.raises(ValueError, match="gates for unknown deltas"):
        make_engine(start=False, gates={"other": gate})
    with pytest.raises(ValueError, match="merged delta cannot be gated"):
        make_engine(start=False, gates={"safety": gate}, merged=True)
    late = ProbeGate(len(model.model.layers) - 1, w.float(), 0.0)
    with pytest.raises(GateError, match="must come before every edited layer"):
        make_engine(start=False, gates={"safety": late})
    assert not patched_modules(model) and not model._forward_pre_hooks


def test_sampling_seed_top_p_and_stop_strings(setup, make_engine):
    _, tok, _, refs = setup
    eng = make_engine()
    ids = chat_ids(tok, PROMPTS[1])
    sampled = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.95, seed=1234)
    a, b = (eng.generate(ids, sampled, model=BASE) for _ in range(2))
    assert a.token_ids == b.token_ids and a.completion_tokens == 6
    # a nucleus smaller than the top token's probability is the top token: greedy
    nucleus = eng.generate(ids, SamplingParams(max_tokens=N, temperature=1.0, top_p=1e-6, seed=1), model=BASE)
    assert list(nucleus.token_ids) == expected(tok, refs[(PROMPTS[1], False)], N, eng.eos_ids)[0]
    # stop strings: cut before the stop, finish "stop", and no partial stop string is streamed
    full = expected(tok, refs[(PROMPTS[0], False)], N, eng.eos_ids)[1]   # "The capital of France is Paris."
    stop = "Paris"
    assert stop in full
    out = eng.generate(chat_ids(tok, PROMPTS[0]), SamplingParams(max_tokens=N, temperature=0, stop=("zzz", stop)),
                       model=BASE)
    assert out.text == full[:full.index(stop)] and out.finish_reason == "stop"
    assert "".join(out.deltas) == out.text and not any("Par" in d for d in out.deltas)


def test_safe_length_holds_back_partial_stops_and_utf8():
    assert _safe_length("hello wor", ("world",)) == 6
    assert _safe_length("hello", ("xyz",)) == 5
    assert _safe_length("ab\ufffd", ()) == 2
    assert _safe_length("say St", ("STOP", "Stop")) == 4
    assert _safe_length("", ("a",)) == 0


def test_engine_rejects_bad_requests_before_queueing(setup, make_engine):
    _, tok, _, _ = setup
    eng = make_engine(start=False, max_queue=1)
    ids = chat_ids(tok, "Hi")
    bad = [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(max_tokens=33), "max_tokens"),             # above max_tokens_limit
        (SamplingParams(max_tokens=4, temperature=2.5), "temperature"),
        (SamplingParams(max_tokens=4, top_p=0.0), "top_p"),
        (SamplingParams(max_tokens=4, stop=("",)), "stop"),
    ]
    for params, param in bad:
        with pytest.raises(ValueError) as info:
            eng.submit(ids, params, _QueueSink(), model=BASE)
        assert info.value.param == param
    with pytest.raises(ValueError, match="maximum context length") as info:
        eng.submit(list(range(100, 350)), SamplingParams(max_tokens=10), _QueueSink(), model=BASE)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(UnknownModelError):
        eng.submit(ids, SamplingParams(max_tokens=4), _QueueSink(), model="gpt-4")
    eng.submit(ids, SamplingParams(max_tokens=4), _QueueSink(), model=BASE)     # fills the queue of 1
    with pytest.raises(QueueFullError):
        eng.submit(ids, SamplingParams(max_tokens=4), _QueueSink(), model=BASE)
    assert eng.stats()["requests"]["rejected"] == 1 and eng.stats()["queue_depth"] == 1


def test_one_failing_request_fails_alone(setup, make_engine, monkeypatch):
    _, tok, _, refs = setup
    eng = make_engine(start=False)
    boom_prompt = chat_ids(tok, "Tell me a joke.")
    real_forward, real_sample = eng._forward, eng._sample_row

    def forward(ids, cache, *a, **kw):
        # The batched prefill of all three raises; retried one by one, only the culprit fails.
        if any(row[:len(boom_prompt)].tolist() == boom_prompt for row in ids):
            raise RuntimeError("injected prefill failure")
        return real_forward(ids, cache, *a, **kw)

    def sample(logits, seq):
        if seq.params.temperature == 1.5:
            raise RuntimeError("injected sampling failure")
        return real_sample(logits, seq)

    monkeypatch.setattr(eng, "_forward", forward)
    monkeypatch.setattr(eng, "_sample_row", sample)
    sinks = {name: _QueueSink() for name in ("ok", "prefill", "sample")}
    eng.submit(chat_ids(tok, PROMPTS[2]), SamplingParams(max_tokens=N, temperature=0), sinks["ok"],
               model=f"{BASE}+safety")
    eng.submit(boom_prompt, SamplingParams(max_tokens=N, temperature=0), sinks["prefill"], model=BASE)
    eng.submit(chat_ids(tok, PROMPTS[0]), SamplingParams(max_tokens=N, temperature=1.5, seed=0), sinks["sample"],
               model=BASE)
    eng.start()
    results = {name: collect(sink)[1] for name, sink in sinks.items()}
    assert isinstance(results["prefill"], Failed) and "prefill" in str(results["prefill"].error)
    assert isinstance(results["sample"], Failed) and "sampling" in str(results["sample"].error)
    assert isinstance(results["ok"], Finished)
    assert list(results["ok"].token_ids) == expected(tok, refs[(PROMPTS[2], True)], N, eng.eos_ids)[0]
    assert eng.stats()["steps"]["prefill_forwards"] == 2   # the two good ones alone; failed forwards not counted

    # A batched forward that raises fails the sequences of that forward only; then serving goes on.
    state = {"armed": True}

    def forward(ids, cache, *a, **kw):
        if state["armed"] and ids.shape[1] == 1:
            state["armed"] = False
            raise RuntimeError("injected forward failure")
        return real_forward(ids, cache, *a, **kw)

    monkeypatch.setattr(eng, "_forward", forward)
    with pytest.raises(RuntimeError, match="injected forward failure"):
        eng.generate(chat_ids(tok, PROMPTS[2]), SamplingParams(max_tokens=4, temperature=0), model=BASE)
    again = eng.generate(chat_ids(tok, PROMPTS[2]), SamplingParams(max_tokens=4, temperature=0), model=BASE)
    assert list(again.token_ids) == expected(tok, refs[(PROMPTS[2], False)], 4, eng.eos_ids)[0]
    stats = eng.stats()
    assert stats["requests"]["failed"] == 3 and stats["steps"]["forward_errors"] == 1 and stats["running"]


# -------------------------------------------------------------------------------------------- HTTP
@pytest.fixture
def client(make_engine):
    from fastapi.testclient import TestClient

    from edit_runtime.serve.app import create_app

    eng = make_engine()
    with TestClient(create_app(eng)) as c:
        c.engine = eng
        yield c


def sse_events(text: str) -> list:
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_http_chat_completion_stream_models_health_metrics(setup, client):
    _, tok, _, refs = setup
    eng = client.engine
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [BASE, f"{BASE}+safety"] and models["object"] == "list"
    assert client.get("/health").json()["status"] == "ok"

    for edited in (False, True):
        name = f"{BASE}+safety" if edited else BASE
        r = client.post("/v1/chat/completions", json={"model": name, "max_tokens": N, "temperature": 0,
                                                      "messages": [{"role": "user", "content": PROMPTS[2]}]})
        assert r.status_code == 200, r.text
        body = r.json()
        toks, text, finish = expected(tok, refs[(PROMPTS[2], edited)], N, eng.eos_ids)
        assert body["object"] == "chat.completion" and body["model"] == name
        assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
        assert body["choices"][0]["finish_reason"] == finish
        n_prompt = len(chat_ids(tok, PROMPTS[2]))
        assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": len(toks),
                                 "total_tokens": n_prompt + len(toks)}

    r = client.post("/v1/chat/completions", json={
        "model": f"{BASE}+safety", "max_tokens": N, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": PROMPTS[1]}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"]["content"] or "" for e in events[:-2])
    assert text == expected(tok, refs[(PROMPTS[1], True)], N, eng.eos_ids)[1]
    assert events[-3]["choices"][0]["finish_reason"] == "length" and events[-2]["usage"]["completion_tokens"] == N

    prompt = RAW
    assert eng.encode_prompt(prompt) == tok(prompt)["input_ids"]
    ref = expected(tok, refs[(RAW, False)], 4, eng.eos_ids)[1]
    r = client.post("/v1/completions", json={"model": BASE, "prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref
    r = client.post("/v1/completions", json={"model": BASE, "prompt": [prompt], "max_tokens": 4, "temperature": 0,
                                             "stream": True})
    events = sse_events(r.text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == ref and events[-1] == "[DONE]"

    prom = client.get("/metrics")
    assert prom.headers["content-type"].startswith("text/plain")
    assert 'edit_runtime_http_requests_total{route="/v1/chat/completions",status="200"} 3' in prom.text
    assert "edit_runtime_time_to_first_token_seconds_bucket" in prom.text
    js = client.get("/metrics", params={"format": "json"}).json()
    assert js["engine"]["requests"]["finished"] == 5 and js["engine"]["latency_s"]["p50"] > 0
    assert js["engine"]["requests"]["by_model"] == {BASE: 3, f"{BASE}+safety": 2}


ERROR_CASES = [
    # (path, raw body or json, status, param, code)
    ("/v1/chat/completions", b'{"model": "smollm2", "messages": [', 400, None, "invalid_json"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("/v1/chat/completions", {"model": BASE}, 400, "messages", "missing_required_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, 400, "model",
     "missing_required_parameter"),
    ("/v1/chat/completions", {"model": BASE, "messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "robot", "content": "Hi"}]}, 400,
     "messages.0.role", "invalid_value"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}]}, 404, "model",
     "model_not_found"),
    ("/v1/chat/completions", {"model": BASE, "max_tokens": -3, "messages": [{"role": "user", "content": "Hi"}]},
     400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {"model": BASE, "max_tokens": 33, "messages": [{"role": "user", "content": "Hi"}]},
     400, "max_tokens", "integer_above_max_value"),
    ("/v1/chat/completions", {"model": BASE, "temperature": 2.5, "messages": [{"role": "user", "content": "Hi"}]},
     400, "temperature", "invalid_value"),
    ("/v1/chat/completions", {"model": BASE, "top_p": 0, "messages": [{"role": "user", "content": "Hi"}]},
     400, "top_p", "invalid_value"),
    ("/v1/chat/completions", {"model": BASE, "n": 2, "messages": [{"role": "user", "content": "Hi"}]},
     400, "n", "invalid_value"),
    ("/v1/chat/completions", {"model": BASE, "stop": ["a", "b", "c", "d", "e"],
                              "messages": [{"role": "user", "content": "Hi"}]}, 400, "stop", "invalid_value"),
    ("/v1/chat/completions", {"model": BASE, "logprobs": True, "messages": [{"role": "user", "content": "Hi"}]},
     400, "logprobs", "invalid_value"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "word " * 300}]},
     400, "messages", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": BASE, "max_tokens": 30,
                              "messages": [{"role": "user", "content": "word " * 200}]},
     400, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"model": BASE, "prompt": ["a", "b"]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": BASE, "prompt": ""}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": BASE, "prompt": [1, 2, 10**9]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": BASE, "prompt": "Hi", "echo": True}, 400, "echo", "invalid_value"),
    ("/v1/completions", {"model": BASE, "prompt": "Hi", "max_tokens": "many"}, 400, "max_tokens", "invalid_value"),
    # strict types, as a strict OpenAI client sends them: no "5" for 5, no "yes" for true
    ("/v1/completions", {"model": BASE, "prompt": "Hi", "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": BASE, "prompt": "Hi", "stream": "yes"}, 400, "stream", "invalid_value"),
    ("/v1/completions", b'{"model": "%s", "prompt": "Hi", "temperature": NaN}' % BASE.encode(), 400,
     "temperature", "invalid_value"),
    ("/v1/completions", {"model": BASE, "prompt": "Hi", "temperature": 1, "seed": 184467440737095516150}, 400,
     "seed", "invalid_value"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages.0.content", "invalid_value"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages.0.content.0.type",
     "invalid_value"),
    ("/v1/nothing", {}, 404, None, "not_found"),
]


def test_http_errors_are_openai_shaped(client):
    for path, body, status, param, code in ERROR_CASES:
        if isinstance(body, bytes):
            r = client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = client.post(path, json=body)
        assert r.status_code == status, (path, body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        assert (err["param"], err["code"]) == (param, code), (body, err)
    image = client.post("/v1/chat/completions", json={"model": BASE, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}).json()["error"]["message"]
    assert "only text content parts are supported, got a 'image_url' part" in image
    assert client.get("/v1/chat/completions").status_code == 405
    stats = client.engine.stats()
    assert stats["requests"]["submitted"] == 0 and stats["running"]  # nothing reached the model


def test_http_queue_full_and_failures_keep_serving(setup, make_engine, monkeypatch):
    from fastapi.testclient import TestClient

    from edit_runtime.serve.app import create_app

    _, tok, _, refs = setup
    chat = {"model": BASE, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": PROMPTS[2]}]}
    idle = make_engine(start=False, max_queue=1)       # never started: the queue cannot drain
    idle.submit(chat_ids(tok, "Hi"), SamplingParams(max_tokens=2), _QueueSink(), model=BASE)
    with TestClient(create_app(idle)) as c:
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"]
        assert c.get("/health").status_code == 503

    eng = make_engine()
    real_sample = eng._sample_row

    def sample(logits, seq):
        if seq.params.temperature == 1.5:
            raise RuntimeError("injected")
        return real_sample(logits, seq)

    monkeypatch.setattr(eng, "_sample_row", sample)
    with TestClient(create_app(eng)) as c:
        r = c.post("/v1/chat/completions", json={**chat, "temperature": 1.5})
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["type"] == "server_error" and err["code"] == "internal_error" and "injected" in err["message"]
        r = c.post("/v1/chat/completions", json={**chat, "temperature": 1.5, "stream": True})
        assert r.status_code == 200 and sse_events(r.text)[-1]["error"]["code"] == "internal_error"
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == expected(tok, refs[(PROMPTS[2], False)], 4,
                                                                        eng.eos_ids)[1]


def test_concurrent_http_clients_share_batches(setup, client):
    _, tok, _, refs = setup
    eng = client.engine
    out: dict[int, dict] = {}

    def one(i: int) -> None:
        p, edited = PROMPTS[i % 3], i % 2 == 1
        r = client.post("/v1/chat/completions", json={
            "model": f"{BASE}+safety" if edited else BASE, "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": p}]})
        out[i] = (p, edited, r.status_code, r.json())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert time.perf_counter() - t0 < 120
    for p, edited, status, body in out.values():
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == expected(tok, refs[(p, edited)], 6, eng.eos_ids)[1]
    assert eng.stats()["batch_size"]["p95"] >= 2


def test_cli_serve_gate_errors_before_loading(tmp_path, capsys):
    """``edit-runtime serve --gate``: a gate for no delta, a gate with --merged and a file that is
    not a gate are clean errors (exit 2) before the model loads."""
    from edit_runtime.cli import main
    from edit_runtime.gate import ProbeGate

    gate = ProbeGate(2, torch.zeros(576), 1.0).save(tmp_path / "g.safetensors")
    delta = random_delta(_tiny_like_smollm2(), 15).save(tmp_path / "d.safetensors")
    base = ["serve", "--model", str(tmp_path / "no-such-model"), "--delta", f"safety={delta}"]
    for extra, message in ((["--gate", f"other={gate}"], "--gate for unknown deltas ['other']"),
                           (["--gate", f"safety={gate}", "--merged"], "cannot be gated per request"),
                           (["--gate", f"safety={delta}"], "is not a probe gate file"),
                           (["--served-model-name", "a+b"], "--served-model-name must be non-empty and without '+'")):
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse: usage error, exit 2
        main(base + ["--port", "99999"])
    assert exit_.value.code == 2 and "a TCP port is 1-65535, got 99999" in capsys.readouterr().err


def test_max_model_len_past_trained_positions_is_refused_unless_allowed(setup, make_engine):
    model = setup[0]
    positions = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds the model's max_position_embeddings {positions}"):
        make_engine(start=False, max_model_len=positions + 1)
    assert not patched_modules(model)
    eng = make_engine(start=False, max_model_len=positions + 1, allow_long_max_model_len=True)
    assert eng.max_model_len == positions + 1


def _tiny_like_smollm2():
    from tiny_models import make_tiny_model

    return make_tiny_model("llama", num_layers=16, hidden_size=576, intermediate_size=64)
