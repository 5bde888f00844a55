"""The server as a user runs it: uvicorn on a free loopback port (in a thread), the real SmolLM2,
and the official ``openai`` client.

Chat, text completion and streaming give, greedily, exactly what ``patch_model`` +
``generate(do_sample=False)`` gives on the same prompt, with the edit on (``<base>+safety``) and
off (``<base>``) per request; errors arrive as the client's typed exceptions; a client that goes
away (mid-stream, or a non-streaming request that times out) frees its slot in the engine.
"""
from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install edit_runtime[serve])")
openai = pytest.importorskip("openai", reason="the client tests need the openai package")
httpx = pytest.importorskip("httpx", reason="the disconnect tests need httpx")
uvicorn = pytest.importorskip("uvicorn", reason="the live server needs uvicorn")

from delta_helpers import random_delta  # noqa: E402
from edit_runtime.arch import find_decoder_layers  # noqa: E402
from edit_runtime.data import render_chat  # noqa: E402
from edit_runtime.patch import patch_model, patched_modules  # noqa: E402
from edit_runtime.serve.app import create_app  # noqa: E402
from edit_runtime.serve.engine import EngineConfig, ServingEngine  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]



BASE = "smollm2"
EDITED = f"{BASE}+safety"
CHAT = ["Write a haiku about the sea.", "Hi"]     # the edit changes both greedy answers
RAW = "The capital of France is"
N = 8


@torch.no_grad()
def _greedy_text(model, tok, ids: list[int]) -> str:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N, do_sample=False)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


@pytest.fixture(scope="module")
def refs(smollm2):
    """Greedy reference texts: {(prompt, edited): text}, from patch_model + generate()."""
    model, tok = smollm2
    assert not patched_modules(model)
    delta = random_delta(model, len(find_decoder_layers(model)[1]) // 2, m=256, r=8, magnitude=0.5, seed=3)

    def chat_ids(text: str) -> list[int]:
        return tok(render_chat(tok, text), add_special_tokens=False)["input_ids"]

    out = {(p, False): _greedy_text(model, tok, chat_ids(p)) for p in CHAT}
    out[(RAW, False)] = _greedy_text(model, tok, tok(RAW)["input_ids"])
    with patch_model(model, delta):
        out.update({(p, True): _greedy_text(model, tok, chat_ids(p)) for p in CHAT})
    assert all(out[(p, True)] != out[(p, False)] for p in CHAT), "the edit should change these answers"
    return delta, out


@pytest.fixture(scope="module")
def live(smollm2, refs):
    """(base_url, engine): uvicorn serving the app on 127.0.0.1:<free port> in a thread."""
    model, tok = smollm2
    engine = ServingEngine(model, tok, {"safety": refs[0]}, served_name=BASE,
                           config=EngineConfig(max_batch_size=8, max_queue=16, max_model_len=512,
                                               max_tokens_limit=256)).start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(30)
        engine.shutdown()
        sock.close()
        assert not patched_modules(model)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live[0]}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_and_chat_with_edit_on_and_off(client, refs):
    assert sorted(m.id for m in client.models.list()) == [BASE, EDITED]
    texts = refs[1]
    for p in CHAT:
        for edited in (False, True):
            r = client.chat.completions.create(model=EDITED if edited else BASE, max_tokens=N, temperature=0,
                                               messages=[{"role": "user", "content": p}])
            assert r.choices[0].message.content == texts[(p, edited)], (p, edited)
            assert r.model == (EDITED if edited else BASE) and r.choices[0].finish_reason in ("stop", "length")
            u = r.usage
            assert u.completion_tokens <= N and u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_completion_and_streaming(client, refs):
    texts = refs[1]
    r = client.completions.create(model=BASE, prompt=RAW, max_tokens=N, temperature=0)
    assert r.choices[0].text == texts[(RAW, False)]

    stream = client.chat.completions.create(model=EDITED, max_tokens=N, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": CHAT[1]}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == texts[(CHAT[1], True)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1

    stream = client.completions.create(model=BASE, prompt=RAW, max_tokens=N, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == texts[(RAW, False)]


def test_client_errors(client):
    msg = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=msg)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=BASE, messages=msg, n=2)
    assert info.value.param == "n"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=BASE, messages=msg, max_tokens=10_000)
    assert info.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=BASE, prompt="word " * 600, max_tokens=4)
    assert info.value.code == "context_length_exceeded"


def _wait_idle(engine: ServingEngine, cancelled_before: int, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats["requests"]["cancelled"] > cancelled_before and stats["active"] == 0 and stats["queue_depth"] == 0:
            return stats
        assert time.monotonic() < deadline, f"the slot was not freed: {stats['requests']}, active {stats['active']}"
        time.sleep(0.05)


def test_disconnects_free_the_slot(live, monkeypatch):
    url, engine = live
    monkeypatch.setattr(engine, "eos_ids", frozenset())   # nothing ends early: only the cancel can
    body = {"model": EDITED, "prompt": RAW, "max_tokens": 200, "temperature": 0}

    before = engine.stats()["requests"]
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break                                   # one event received, then hang up
    stats = _wait_idle(engine, before["cancelled"])
    assert stats["requests"]["finished"] == before["finished"], (before, stats["requests"])

    before = stats["requests"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(60.0, read=1.0))
    stats = _wait_idle(engine, before["cancelled"])
    assert stats["requests"]["finished"] == before["finished"], (before, stats["requests"])

    r = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 2}, timeout=60)   # still serving
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
