"""The serving engine: one background thread runs the model with continuous batching.

Requests enter a bounded FIFO queue (:meth:`ServingEngine.submit`; a full queue raises
:class:`QueueFullError`). A single engine thread loops:

1. **admit**: while fewer than ``max_batch_size`` sequences are active, take the oldest waiting
   requests and **prefill** them: one forward over their prompts, right-padded (padding after
   the prompt is causally invisible to every real token, so each row computes what the prompt
   alone would, and no query row is fully masked), logits only at each row's last real token;
   sample each first token;
2. **join**: the new sequences' KV caches (their real tokens only) are left-padded to a common
   length and concatenated with the running batch's cache (one rebuild per admission round);
3. **decode**: *one* forward pass over all active sequences, input ``(B, 1)`` (each row's last
   token), a ``(B, L + 1)`` attention mask that hides each row's left padding, per-row position
   ids (the row's true length, so RoPE sees unpadded positions) and the shared cache;
4. finished, failed or cancelled sequences leave the batch (their rows are dropped and padding
   columns no remaining row needs are trimmed) and new requests join at the next iteration.

This is *continuous* batching (sequences join and leave between decode steps) rather than
dynamic batching at admission: a long generation never holds short ones hostage, and the batch
stays full under load. Padding columns hold zeros and are masked, so they get exactly zero
attention weight: batching changes greedy tokens only through fp32 summation order. Prefill is
not chunked: a long prompt delays the running batch's next step by its own forward.

**Edits per request.** Every delta is patched once at start-up with ``patch_model``; before
each forward the engine writes one ``(B,)`` row mask per delta (``handle.set_row_mask``): 1 for
the rows whose request asked for that delta, 0 elsewhere. Requests with and without an edit (or
with different edits) thus share every forward. With ``merged=True`` (one delta only) the edit is
folded into the weights (``handle.merge()``) at start-up: zero runtime overhead, and the plain
base model is no longer offered. ``shutdown()`` removes every patch (merged weights are restored
bit for bit).

**Model names.** The base model is served as ``served_name`` (default: the model's short name);
base plus delta ``D`` as ``f"{served_name}+{D}"``.

**Gated edits.** A delta given a probe gate (``gates={name: ProbeGate | path}``,
:mod:`edit_runtime.gate`) is on for a request only if the request asked for it *and* the probe
fires on its prompt. In the prefill the gate's hook, on a decoder layer before the edit, sets the
row mask to (asked for) AND (probe fires); the decision is stored on the sequence and reused for
every decode step, so a gated sequence stays exactly base or exactly edited whichever batch it
decodes in. ``stats()["gate"]`` counts the decisions per delta.

**Isolation.** Per-row work (sampling, detokenizing, stop strings, delivering events) runs in a
``try`` per sequence: an exception fails that request only (a :class:`Failed` event, HTTP 500),
the others continue. An exception in a batched forward fails the sequences of that forward (it
cannot be attributed to one of them) and the engine carries on with the queue.

Events go to each request's ``sink`` (a callable, called from the engine thread): zero or more
:class:`TextDelta`, then exactly one :class:`Finished` or :class:`Failed` (none after a cancel).

Only full-attention decoders are supported (Llama, Qwen2, Mistral/Gemma without sliding
layers); a config with sliding-window layers is refused at construction.
"""
from __future__ import annotations

import bisect
import collections
import inspect
import logging
import os
import queue as queue_mod
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    import torch

    from edit_runtime.delta import SparseDelta
    from edit_runtime.gate import GateHandle, ProbeGate
    from edit_runtime.patch import PatchHandle

log = logging.getLogger(__name__)

__all__ = [
    "EngineConfig",
    "SamplingParams",
    "ServingEngine",
    "TextDelta",
    "Finished",
    "Failed",
    "Event",
    "Completion",
    "RequestError",
    "UnknownModelError",
    "QueueFullError",
    "ContextLengthError",
    "EngineStoppedError",
    "Histogram",
    "EngineMetrics",
]


# ----------------------------------------------------------------------------------------- errors
class RequestError(ValueError):
    """A request the engine refuses; carries the HTTP status and the OpenAI error fields."""

    status: int = 400
    type: str = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, type: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type


class UnknownModelError(RequestError):
    """The request's ``model`` is none of the served names (HTTP 404, code ``model_not_found``)."""

    status = 404

    def __init__(self, name: str, served: Sequence[str]):
        super().__init__(f"The model {name!r} does not exist; this server serves: {', '.join(served)}",
                         param="model", code="model_not_found")


class QueueFullError(RequestError):
    """The waiting queue holds ``max_queue`` requests already (HTTP 503, retry later)."""

    status = 503
    type = "server_error"

    def __init__(self, max_queue: int):
        super().__init__(f"The server is overloaded: {max_queue} requests are already waiting; retry later",
                         code="queue_full")


class ContextLengthError(RequestError):
    """Prompt plus ``max_tokens`` exceed ``max_model_len`` (HTTP 400)."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class EngineStoppedError(RequestError):
    """The engine is shut down or not started (HTTP 503)."""

    status = 503
    type = "server_error"

    def __init__(self, message: str = "The engine is not running"):
        super().__init__(message, code="engine_stopped")


# ----------------------------------------------------------------------------------------- params
@dataclass(frozen=True)
class SamplingParams:
    """How to generate one completion.

    ``temperature`` 0 is greedy (argmax, what ``generate(do_sample=False)`` does); otherwise
    softmax sampling at that temperature restricted to the top-``top_p`` nucleus, from a
    ``torch.Generator`` seeded with ``seed`` (random when None). Generation ends at an EOS token
    (``finish_reason`` "stop"), when the text contains one of ``stop`` (the text is cut before
    it, "stop") or after ``max_tokens`` tokens ("length").
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))

    def validate(self) -> None:
        """Raises :class:`RequestError` naming the bad field and the allowed range."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", param="max_tokens",
                               code="invalid_value")
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise RequestError(f"temperature must be in [0, 2], got {self.temperature!r}", param="temperature",
                               code="invalid_value")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}", param="top_p", code="invalid_value")
        if len(self.stop) > 4:
            raise RequestError(f"at most 4 stop sequences are allowed, got {len(self.stop)}", param="stop",
                               code="invalid_value")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise RequestError(f"stop sequences must be non-empty strings, got {s!r}", param="stop",
                                   code="invalid_value")


@dataclass(frozen=True)
class EngineConfig:
    """Limits of a :class:`ServingEngine`.

    max_batch_size: most sequences decoded together (one forward per step).
    max_queue: most requests waiting for a slot; more raise :class:`QueueFullError`.
    max_model_len: prompt + completion tokens per sequence (default: the model's
        ``max_position_embeddings``, else 4096). More than ``max_position_embeddings`` is refused
        unless ``allow_long_max_model_len``.
    max_tokens_limit: largest ``max_tokens`` a request may ask for.
    merged: fold the only delta into the weights (the base model is then not served).
    check_fingerprint: refuse deltas fitted on another model.
    max_prefill_tokens: most padded tokens (rows x longest prompt) in one prefill forward.
    allow_long_max_model_len: accept a ``max_model_len`` past the model's trained positions.
    """

    max_batch_size: int = 8
    max_queue: int = 64
    max_model_len: int | None = None
    max_tokens_limit: int = 2048
    merged: bool = False
    check_fingerprint: bool = True
    max_prefill_tokens: int = 8192
    allow_long_max_model_len: bool = False

    def validate(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_tokens_limit", "max_prefill_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")


# ----------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class TextDelta:
    """New text of a request (streaming); ``token_ids`` are the tokens generated since the last one."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    """The request is done: the full text (stop string excluded) and the usage counts.

    ``completion_tokens`` counts every generated token, the EOS token included when one ended it.
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str          # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The request failed inside the engine; ``error`` is the exception (HTTP 500 unless a RequestError)."""

    request_id: str
    error: BaseException


Event = TextDelta | Finished | Failed


@dataclass(frozen=True)
class Completion:
    """Result of :meth:`ServingEngine.generate` (the blocking helper)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    deltas: tuple[str, ...]     # the streamed pieces, in order; "".join(deltas) == text


# ---------------------------------------------------------------------------------------- metrics
class Histogram:
    """Cumulative bucket counts (Prometheus style) plus the last ``window`` values for percentiles.

    Not thread-safe by itself; :class:`EngineMetrics` guards it with its lock.
    """

    def __init__(self, buckets: Sequence[float], window: int = 10_000):
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self.counts = [0] * (len(self.buckets) + 1)    # last one: +Inf
        self.count = 0
        self.sum = 0.0
        self.recent: collections.deque[float] = collections.deque(maxlen=window)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.count += 1
        self.sum += value
        self.recent.append(value)

    def percentile(self, q: float) -> float | None:
        """Linear-interpolated ``q``-quantile (0..1) of the recent window; None when empty."""
        if not self.recent:
            return None
        xs = sorted(self.recent)
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    def snapshot(self) -> dict[str, Any]:
        cumulative: list[tuple[float | str, int]] = []
        running = 0
        for le, c in zip([*self.buckets, "+Inf"], self.counts):  # "+Inf" keeps the JSON standard
            running += c
            cumulative.append((le, running))
        return {
            "count": self.count,
            "sum": self.sum,
            "mean": self.sum / self.count if self.count else None,
            "p50": self.percentile(0.50),
            "p95": self.percentile(0.95),
            "p99": self.percentile(0.99),
            "buckets": cumulative,
        }


_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class EngineMetrics:
    """Thread-safe counters and histograms of one engine; :meth:`snapshot` gives a plain dict."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.counters: dict[str, int] = collections.Counter()
        self.finish_reasons: dict[str, int] = collections.Counter()
        self.requests_by_model: dict[str, int] = collections.Counter()
        self.latency = Histogram(_TIME_BUCKETS)          # submit -> finish
        self.ttft = Histogram(_TIME_BUCKETS)             # submit -> first token
        self.queue_wait = Histogram(_TIME_BUCKETS)       # submit -> prefill starts
        self.step_time = Histogram(_TIME_BUCKETS)        # one batched decode forward + sampling
        self.prefill_time = Histogram(_TIME_BUCKETS)
        self.batch_size = Histogram(_BATCH_BUCKETS)      # rows per decode step

    def inc(self, name: str, by: int = 1) -> None:
        with self.lock:
            self.counters[name] += by

    def snapshot(self, **gauges: Any) -> dict[str, Any]:
        with self.lock:
            c = dict(self.counters)
            uptime = time.time() - self.started
            return {
                "uptime_s": uptime,
                "requests": {
                    "submitted": c.get("submitted", 0),
                    "finished": c.get("finished", 0),
                    "failed": c.get("failed", 0),
                    "rejected": c.get("rejected", 0),
                    "cancelled": c.get("cancelled", 0),
                    "finish_reasons": dict(self.finish_reasons),
                    "by_model": dict(self.requests_by_model),
                },
                "tokens": {
                    "prompt": c.get("prompt_tokens", 0),
                    "completion": c.get("completion_tokens", 0),
                    "completion_per_s": c.get("completion_tokens", 0) / uptime if uptime > 0 else 0.0,
                },
                "steps": {"decode": c.get("decode_steps", 0), "prefill": c.get("prefills", 0),
                          "prefill_forwards": c.get("prefill_forwards", 0),
                          "forward_errors": c.get("forward_errors", 0)},
                "latency_s": self.latency.snapshot(),
                "ttft_s": self.ttft.snapshot(),
                "queue_wait_s": self.queue_wait.snapshot(),
                "decode_step_s": self.step_time.snapshot(),
                "prefill_s": self.prefill_time.snapshot(),
                "batch_size": self.batch_size.snapshot(),
                **gauges,
            }


# -------------------------------------------------------------------------------------- sequences
@dataclass(eq=False)
class _Sequence:
    """One request inside the engine (engine thread only, except ``cancelled``)."""

    request_id: str
    prompt_ids: list[int]
    delta: str | None
    params: SamplingParams
    sink: Callable[[Event], None]
    submitted: float
    model_name: str
    generator: "torch.Generator | None" = None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0                    # characters of ``text`` already delivered
    sent_tokens: int = 0                # tokens already delivered with a TextDelta
    first_token_at: float | None = None
    finish_reason: str | None = None
    done: bool = False
    gate_on: bool = True                # a gated delta: the probe's prefill decision

    @property
    def cache_len(self) -> int:
        """Tokens of this sequence in the KV cache (the last generated token is not in it yet)."""
        return len(self.prompt_ids) + len(self.generated) - 1


class _QueueSink:
    """A sink collecting events into a ``queue.Queue`` (for blocking callers)."""

    def __init__(self) -> None:
        self.queue: queue_mod.Queue = queue_mod.Queue()

    def __call__(self, event: Event) -> None:
        self.queue.put(event)


def _default_served_name(name_or_path: str | os.PathLike | None, model: Any) -> str:
    if name_or_path is not None:
        text = str(name_or_path).rstrip("/")
        return Path(text).name.removesuffix(".gguf") if ("/" in text or text.endswith(".gguf")) else text
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return Path(str(path).rstrip("/")).name or type(model).__name__


# ----------------------------------------------------------------------------------------- engine
class ServingEngine:
    """Continuous-batching generation over one model with per-request deltas.

    Args:
        model: a loaded causal LM (eval mode, final device/dtype); the engine thread is the only
            user of it while the engine runs.
        tokenizer: its tokenizer (chat template used for chat requests).
        deltas: ``{name: SparseDelta | path}``; each is patched at construction.
        gates: ``{delta name: ProbeGate | path}``: those deltas are on only where their probe
            fires (module docstring, "Gated edits"); not with ``config.merged``.
        config: :class:`EngineConfig`.
        served_name: the base model's name in requests (default: the short name / folder name).
        model_name_or_path: used for the default ``served_name``.

    Use ``start()`` / ``shutdown()`` (or ``with engine:``), ``submit()`` / ``cancel()``, or the
    blocking ``generate()``. Construction raises ``ValueError``/``DeltaError``/``PatchError`` on
    bad configuration with the model left unpatched.
    """

    def __init__(self, model: Any, tokenizer: Any, deltas: Mapping[str, "SparseDelta | str | Path"] | None = None,
                 *, config: EngineConfig | None = None, served_name: str | None = None,
                 model_name_or_path: str | os.PathLike | None = None,
                 gates: Mapping[str, "ProbeGate | str | Path"] | None = None):
        import torch

        from edit_runtime.gate import ProbeGate, attach_gate
        from edit_runtime.patch import patch_model

        self.config = config or EngineConfig()
        self.config.validate()
        self.model = model
        self.tokenizer = tokenizer
        self.served_name = served_name or _default_served_name(model_name_or_path, model)
        deltas = dict(deltas or {})
        for name in deltas:
            if not isinstance(name, str) or not name or "+" in name or name != name.strip():
                raise ValueError(f"delta name must be a non-empty string without '+' or surrounding spaces, "
                                 f"got {name!r}")
        if "+" in self.served_name:
            raise ValueError(f"served name must not contain '+', got {self.served_name!r}")
        if self.config.merged and len(deltas) != 1:
            raise ValueError(f"merged mode serves exactly one delta, got {len(deltas)} ({', '.join(deltas) or 'none'})")
        gates = dict(gates or {})
        unknown = [name for name in gates if name not in deltas]
        if unknown:
            raise ValueError(f"gates for unknown deltas {unknown}; deltas: {', '.join(deltas) or 'none'}")
        if gates and self.config.merged:
            raise ValueError("a merged delta cannot be gated per request: drop merged or the gate")
        # gate files are read before anything is patched
        gates = {name: g if isinstance(g, ProbeGate) else ProbeGate.load(g) for name, g in gates.items()}
        _check_attention(model)

        mcfg = getattr(model, "config", None)
        positions = getattr(mcfg, "max_position_embeddings", None)
        if self.config.max_model_len is not None and positions and self.config.max_model_len > positions \
                and not self.config.allow_long_max_model_len:
            raise ValueError(f"max_model_len {self.config.max_model_len} exceeds the model's max_position_embeddings "
                             f"{positions}: positions past it were never trained and generations degrade; lower it, "
                             "or allow it explicitly (EngineConfig.allow_long_max_model_len, "
                             "--allow-long-max-model-len)")
        limit = self.config.max_model_len or positions or 4096
        self.max_model_len = int(limit)
        self.max_tokens_limit = int(self.config.max_tokens_limit)
        self.device = next(model.parameters()).device
        fwd = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in fwd else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in fwd else None
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = _pad_id(tokenizer, self.eos_ids)
        self.tokenizer_lock = threading.Lock()

        # Patch every delta now (all-or-nothing across deltas too).
        self.handles: dict[str, "PatchHandle"] = {}
        self.gate_handles: dict[str, "GateHandle"] = {}
        try:
            for name, delta in deltas.items():
                self.handles[name] = patch_model(model, delta, check_fingerprint=self.config.check_fingerprint)
            for name, gate in gates.items():
                self.gate_handles[name] = attach_gate(self.handles[name], gate)
            if self.config.merged:
                next(iter(self.handles.values())).merge()
        except BaseException:
            self._remove_patches()
            raise
        self.merged = self.config.merged
        self._model_map: dict[str, str | None] = {}
        if not self.merged:
            self._model_map[self.served_name] = None
        for name in self.handles:
            self._model_map[f"{self.served_name}+{name}"] = name

        self.metrics = EngineMetrics()
        self._gate_counts = {name: {"on": 0, "off": 0} for name in self.gate_handles}
        self._cv = threading.Condition()
        self._pending: collections.deque[_Sequence] = collections.deque()
        self._cancelled: set[str] = set()
        self._active: list[_Sequence] = []
        self._cache: Any = None                  # DynamicCache over the active rows
        self._attn: "torch.Tensor | None" = None  # (B, L) int64, 0 on left padding
        self._thread: threading.Thread | None = None
        self._threads = 1
        self._stop = False
        self._closed = False
        self._torch = torch
        log.info("engine ready: models %s, max batch %d, queue %d, max_model_len %d%s",
                 ", ".join(self._model_map), self.config.max_batch_size, self.config.max_queue,
                 self.max_model_len, " (merged)" if self.merged else "")

    # -- naming ------------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        """The names a request's ``model`` may take."""
        return list(self._model_map)

    def resolve_model(self, name: str) -> str | None:
        """The delta name a model name selects (None: the base model); :class:`UnknownModelError` otherwise."""
        if name not in self._model_map:
            raise UnknownModelError(name, self.model_names)
        return self._model_map[name]

    # -- tokenization ------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a chat (``[{"role", "content"}, ...]``) with the generation prompt appended.

        The tokenizer's chat template renders the text (for one user message this is exactly
        ``edit_runtime.data.render_chat(tokenizer, text)``); it is encoded without adding special
        tokens, since the template writes them.
        """
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise RequestError("this model's tokenizer has no chat template; use /v1/completions",
                               param="messages", code="no_chat_template")
        with self.tokenizer_lock:
            try:
                text = self.tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True,
                                                          tokenize=False)
            except Exception as exc:  # noqa: BLE001 - jinja raises TemplateError and friends
                raise RequestError(f"the chat template rejected these messages: {exc}", param="messages",
                                   code="invalid_messages") from exc
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(ids)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a raw completion prompt, with the tokenizer's special tokens (e.g. BOS)."""
        with self.tokenizer_lock:
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams, *, prompt_param: str = "messages",
                      max_tokens_given: bool = True) -> None:
        """Raises :class:`RequestError` if the prompt or parameters do not fit the engine's limits."""
        params.validate()
        n = len(prompt_ids)
        if n == 0:
            raise RequestError("the prompt is empty (no tokens)", param=prompt_param, code="empty_prompt")
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if vocab is not None and any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})", param=prompt_param,
                               code="invalid_value")
        if params.max_tokens > self.max_tokens_limit:
            raise RequestError(f"max_tokens is {params.max_tokens}, above this server's limit of "
                               f"{self.max_tokens_limit}", param="max_tokens", code="integer_above_max_value")
        if n >= self.max_model_len:
            raise ContextLengthError(f"This model's maximum context length is {self.max_model_len} tokens; the "
                                     f"prompt has {n} tokens", param=prompt_param)
        if n + params.max_tokens > self.max_model_len:
            what = "max_tokens" if max_tokens_given else "the default max_tokens"
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has {n} tokens "
                f"and {what} is {params.max_tokens} ({n + params.max_tokens} in total); reduce the prompt or "
                f"max_tokens", param="max_tokens" if max_tokens_given else prompt_param)

    def default_max_tokens(self, prompt_len: int) -> int:
        """``max_tokens`` when a chat request gives none: what is left of the context, within the limit."""
        return max(1, min(self.max_tokens_limit, self.max_model_len - prompt_len))

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    def start(self) -> "ServingEngine":
        """Starts the engine thread (idempotent)."""
        if self._closed:
            raise EngineStoppedError("the engine was shut down; build a new one")
        if self._thread is None:
            self._threads = self._torch.get_num_threads()  # the caller's setting, re-applied in the thread
            self._thread = threading.Thread(target=self._run, name="edit-runtime-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops the thread, fails what is waiting or running (503), and removes every patch."""
        if self._closed:
            return
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("engine thread did not stop within %.0f s", timeout)
        err = EngineStoppedError("the server is shutting down")
        with self._cv:
            leftover = list(self._pending) + list(self._active)
            self._pending.clear()
            self._active = []
        for seq in leftover:
            if not seq.done:
                self._deliver_failure(seq, err)
        self._cache = self._attn = None
        self._remove_patches()
        self._closed = True
        log.info("engine stopped; patches removed")

    def _remove_patches(self) -> None:
        for gh in self.gate_handles.values():
            if not gh.removed:
                gh.remove()
        for h in reversed(list(self.handles.values())):
            if not h.removed:
                h.remove()

    def __enter__(self) -> "ServingEngine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- requests ----------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, sink: Callable[[Event], None], *,
               model: str | None = None, delta: str | None = None, request_id: str | None = None) -> str:
        """Queues a request; returns its id. Events go to ``sink`` from the engine thread.

        Either ``model`` (a served name) or ``delta`` (a delta name, None = base) selects the
        weights. Raises :class:`RequestError` subclasses (bad parameters, context length, unknown
        model, :class:`QueueFullError`, :class:`EngineStoppedError`) before anything is queued.
        """
        if model is not None:
            delta = self.resolve_model(model)
        elif delta is not None and delta not in self.handles:
            raise RequestError(f"unknown delta {delta!r}; deltas: {', '.join(self.handles) or 'none'}",
                               param="model", code="model_not_found", status=404)
        elif delta is None and self.merged:
            raise UnknownModelError(self.served_name, self.model_names)
        prompt_ids = [int(t) for t in prompt_ids]
        self.check_request(prompt_ids, params)
        rid = request_id or f"cmpl-{uuid.uuid4().hex}"
        name = self.served_name if delta is None else f"{self.served_name}+{delta}"
        gen = None
        if params.temperature > 0:
            gen = self._torch.Generator()
            gen.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        seq = _Sequence(rid, prompt_ids, delta, params, sink, time.perf_counter(), name, gen)
        with self._cv:
            if self._stop or self._closed:
                raise EngineStoppedError("the server is shutting down" if self._stop else "the engine is not running")
            if len(self._pending) >= self.config.max_queue:
                self.metrics.inc("rejected")
                raise QueueFullError(self.config.max_queue)
            self._pending.append(seq)
            self._cv.notify_all()
        with self.metrics.lock:
            self.metrics.counters["submitted"] += 1
            self.metrics.requests_by_model[name] += 1
        return rid

    def cancel(self, request_id: str) -> None:
        """Drops a waiting or running request (its slot is freed before the next step); no more
        events are delivered for it. Unknown or finished ids are ignored."""
        with self._cv:
            self._cancelled.add(request_id)
            self._cv.notify_all()

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, model: str | None = None,
                 delta: str | None = None, timeout: float | None = 600.0) -> Completion:
        """Blocking helper: submits, waits, returns the :class:`Completion` (raises what failed it)."""
        sink = _QueueSink()
        rid = self.submit(prompt_ids, params or SamplingParams(), sink, model=model, delta=delta)
        pieces: list[str] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ev = sink.queue.get(timeout=left)
            except queue_mod.Empty:
                self.cancel(rid)
                raise TimeoutError(f"request {rid} did not finish within {timeout} s") from None
            if isinstance(ev, TextDelta):
                pieces.append(ev.text)
            elif isinstance(ev, Finished):
                return Completion(ev.text, ev.token_ids, ev.finish_reason, ev.prompt_tokens, ev.completion_tokens,
                                  tuple(pieces))
            else:
                raise ev.error

    def stats(self) -> dict[str, Any]:
        """Metrics snapshot (plain dict) with the current queue depth and batch size."""
        with self._cv:
            depth, active = len(self._pending), len(self._active)
        with self.metrics.lock:
            gate = {name: {**counts, "layer": self.gate_handles[name].gate.layer,
                           "threshold": self.gate_handles[name].gate.threshold}
                    for name, counts in self._gate_counts.items()}
        return self.metrics.snapshot(queue_depth=depth, active=active, max_batch_size=self.config.max_batch_size,
                                     max_queue=self.config.max_queue, running=self.running,
                                     models=self.model_names, merged=self.merged, gate=gate)

    # -- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        torch = self._torch
        torch.set_num_threads(self._threads)
        log.debug("engine thread started with %d torch threads", self._threads)
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self._pending and not self._active:
                        self._cv.wait()
                    if self._stop:
                        break
                    cancelled, self._cancelled = self._cancelled, set()
                    admitted = []
                    if cancelled:
                        kept = collections.deque(s for s in self._pending if s.request_id not in cancelled)
                        self.metrics.inc("cancelled", len(self._pending) - len(kept))
                        self._pending = kept
                    while self._pending and len(self._active) + len(admitted) < self.config.max_batch_size:
                        admitted.append(self._pending.popleft())
                try:
                    self._iteration(admitted, cancelled)
                except Exception:  # noqa: BLE001 - the loop must survive anything
                    log.exception("engine iteration failed; failing the sequences of this iteration")
                    self._fail_all(RuntimeError("internal engine error"), admitted)
        log.debug("engine thread finished")

    def _iteration(self, admitted: list[_Sequence], cancelled: set[str]) -> None:
        for seq in self._active:
            if seq.request_id in cancelled:
                seq.done = True
                seq.finish_reason = "cancelled"
                self.metrics.inc("cancelled")
        joiners: dict[_Sequence, list] = {}
        for group in self._prefill_groups(admitted):
            joiners.update(self._prefill(group))
        self._reshape([s for s in self._active if not s.done] + list(joiners), joiners)
        if self._active:
            self._decode_step()

    def _fail_all(self, error: BaseException, extra: Iterable[_Sequence] = ()) -> None:
        victims = {id(s): s for s in [*self._active, *extra]}
        for seq in victims.values():
            if not seq.done:
                self._deliver_failure(seq, error)
        with self._cv:
            self._active = []
        self._cache = self._attn = None

    # -- model calls -------------------------------------------------------------------------
    def _set_masks(self, rows: Sequence[_Sequence], *, prefill: bool = False) -> None:
        if self.merged:
            return
        for name, handle in self.handles.items():
            asked = [s.delta == name for s in rows]
            gh = self.gate_handles.get(name)
            if gh is None:
                handle.set_row_mask(asked)
            elif prefill:
                # the gate's hook sets (asked AND probe fires) inside the forward, before the edit
                gh.allowed, gh.last_mask = asked, None
                handle.set_row_mask([False] * len(rows), owner=gh)
            else:  # decode: the gate's prefill decision, kept per sequence
                handle.set_row_mask([a and s.gate_on for a, s in zip(asked, rows)], owner=gh)

    def _record_gate_decisions(self, seqs: Sequence[_Sequence]) -> None:
        """Stores each gated sequence's prefill decision (reused by every decode step)."""
        for name, gh in self.gate_handles.items():
            decided = gh.last_mask
            for i, seq in enumerate(seqs):
                if seq.delta == name:
                    seq.gate_on = bool(decided[i]) if decided is not None else False
            counts = [s.gate_on for s in seqs if s.delta == name]
            with self.metrics.lock:
                self._gate_counts[name]["on"] += sum(counts)
                self._gate_counts[name]["off"] += len(counts) - sum(counts)

    def _forward(self, input_ids: "torch.Tensor", cache: Any, attention_mask: "torch.Tensor | None" = None,
                 position_ids: "torch.Tensor | None" = None, keep: "torch.Tensor | None" = None) -> "torch.Tensor":
        """One model forward over ``input_ids (B, T)``, filling ``cache``.

        Returns float32 logits: ``(B, V)`` at the last position, or with ``keep`` (1-D sorted
        positions) ``(B, len(keep), V)`` at those positions (only they go through the LM head).
        """
        kw: dict[str, Any] = {self._cache_kw: cache, "use_cache": True}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        if position_ids is not None:
            kw["position_ids"] = position_ids
        if self._keep_kw:
            kw[self._keep_kw] = 1 if keep is None else keep
        logits = self.model(input_ids=input_ids, **kw).logits
        if keep is None:
            return logits[:, -1, :].float()
        if not self._keep_kw:  # the model returned every position
            logits = logits[:, keep, :]
        return logits.float()

    def _prefill_groups(self, seqs: list[_Sequence]) -> list[list[_Sequence]]:
        """Admitted sequences sorted by prompt length (less padding), cut into groups of at most
        ``max_prefill_tokens`` padded tokens per forward."""
        groups: list[list[_Sequence]] = []
        for seq in sorted(seqs, key=lambda q: len(q.prompt_ids)):
            group = groups[-1] if groups else None
            if group is None or (len(group) + 1) * len(seq.prompt_ids) > self.config.max_prefill_tokens:
                groups.append([seq])
            else:
                group.append(seq)
        return groups

    def _prefill(self, seqs: list[_Sequence]) -> dict[_Sequence, list]:
        """Prefills ``seqs`` in one forward (right padding) and samples each first token.

        Returns ``{seq: per-layer (k, v) of its real tokens}`` for the sequences that go on to
        decode. Right padding keeps every real query's attention exactly that of the prompt alone
        (padding sits after it, causally masked) and no query row is fully masked. The logits are
        taken at each row's last real position. If the batched forward raises, each sequence is
        retried alone, so a request that breaks the forward fails by itself.
        """
        torch = self._torch
        from transformers import DynamicCache

        t0 = time.perf_counter()
        with self.metrics.lock:
            for seq in seqs:
                self.metrics.queue_wait.observe(t0 - seq.submitted)
        lens = [len(seq.prompt_ids) for seq in seqs]
        B, T = len(seqs), max(lens)
        try:
            ids = torch.full((B, T), self.pad_id, dtype=torch.long, device=self.device)
            attn = torch.zeros((B, T), dtype=torch.long, device=self.device)
            for i, seq in enumerate(seqs):
                ids[i, :lens[i]] = torch.tensor(seq.prompt_ids, dtype=torch.long)
                attn[i, :lens[i]] = 1
            last = torch.tensor([n - 1 for n in lens], device=self.device)
            cache = DynamicCache()
            self._set_masks(seqs, prefill=True)
            if B == 1:
                logits = self._forward(ids, cache)                                        # (1, V)
            else:
                keep = torch.unique(last)                                                 # sorted
                pos = torch.arange(T, device=self.device).expand(B, T)
                full = self._forward(ids, cache, attn, pos, keep=keep)                    # (B, k, V)
                logits = full[torch.arange(B), torch.searchsorted(keep, last)]            # (B, V)
            layers = _cache_tensors(cache)
            self._record_gate_decisions(seqs)
        except Exception as exc:  # noqa: BLE001
            if B > 1:
                log.warning("batched prefill of %d requests failed (%s); retrying them one by one", B, exc)
                out: dict[_Sequence, list] = {}
                for seq in seqs:
                    out.update(self._prefill([seq]))
                return out
            log.exception("request %s failed in prefill", seqs[0].request_id)
            self._deliver_failure(seqs[0], exc)
            return {}
        with self.metrics.lock:
            self.metrics.counters["prefills"] += B
            self.metrics.counters["prefill_forwards"] += 1
            self.metrics.prefill_time.observe(time.perf_counter() - t0)
        greedy = logits.argmax(dim=-1).tolist()
        out = {}
        for i, seq in enumerate(seqs):
            if not self._take_token(seq, greedy[i], logits[i], "its first token"):
                continue
            if not seq.done:
                out[seq] = [(k[i:i + 1, :, :lens[i]], v[i:i + 1, :, :lens[i]]) for k, v in layers]
        return out

    def _reshape(self, rows: list[_Sequence], joiners: Mapping[_Sequence, list]) -> None:
        """Rebuilds the batch cache for ``rows`` (current rows first, then joiners): each row's
        real tokens right-aligned, zero left padding, columns no row needs trimmed."""
        torch = self._torch
        from transformers import DynamicCache

        if [id(s) for s in rows] == [id(s) for s in self._active] and not joiners:
            return
        if not rows:
            with self._cv:
                self._active = []
            self._cache = self._attn = None
            return
        old = _cache_tensors(self._cache) if self._cache is not None else None
        old_index = {id(s): i for i, s in enumerate(self._active)}
        lens = [s.cache_len for s in rows]
        L = max(lens)
        layers = []
        n_layers = len(old) if old is not None else len(next(iter(joiners.values())))
        for li in range(n_layers):
            ks, vs = [], []
            for seq, n in zip(rows, lens):
                if seq in joiners:
                    k, v = joiners[seq][li]
                else:
                    i = old_index[id(seq)]
                    k, v = old[li][0][i:i + 1, :, -n:], old[li][1][i:i + 1, :, -n:]
                if n < L:
                    k = torch.nn.functional.pad(k, (0, 0, L - n, 0))
                    v = torch.nn.functional.pad(v, (0, 0, L - n, 0))
                ks.append(k)
                vs.append(v)
            layers.append((torch.cat(ks), torch.cat(vs)))
        attn = torch.zeros(len(rows), L, dtype=torch.long, device=self.device)
        for i, n in enumerate(lens):
            attn[i, L - n:] = 1
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._attn = attn
        with self._cv:
            self._active = list(rows)

    def _decode_step(self) -> None:
        """One forward over every active row, then per-row sampling; finished rows leave."""
        torch = self._torch
        rows = self._active
        B = len(rows)
        t0 = time.perf_counter()
        ids = torch.tensor([[s.generated[-1]] for s in rows], dtype=torch.long, device=self.device)
        pos = torch.tensor([[s.cache_len] for s in rows], dtype=torch.long, device=self.device)
        attn = torch.cat([self._attn, torch.ones(B, 1, dtype=torch.long, device=self.device)], dim=1)
        try:
            self._set_masks(rows)
            logits = self._forward(ids, self._cache, attn, pos)
        except Exception as exc:  # noqa: BLE001
            log.exception("batched forward of %d sequences failed; failing them", B)
            self.metrics.inc("forward_errors")
            self._fail_all(exc)
            return
        self._attn = attn
        # The step is counted before any of its tokens reaches a client, so metrics read after a
        # response include the step that finished it (step time, sampling included, comes after).
        with self.metrics.lock:
            self.metrics.counters["decode_steps"] += 1
            self.metrics.batch_size.observe(B)
        greedy = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(rows):
            if seq.done:
                continue
            self._take_token(seq, greedy[i], logits[i], "its token")
        with self.metrics.lock:
            self.metrics.step_time.observe(time.perf_counter() - t0)
        self._reshape([s for s in rows if not s.done], {})

    # -- per-row work ------------------------------------------------------------------------
    def _take_token(self, seq: _Sequence, greedy_token: int, logits_row: Any, what: str) -> bool:
        """Picks ``seq``'s next token (greedy, or sampled from its logits row) and advances it;
        a failure fails that request only. True when it advanced."""
        try:
            token = greedy_token if seq.generator is None else self._sample_row(logits_row, seq)
            self._advance(seq, token)
        except Exception as exc:  # noqa: BLE001 - one request's failure stays its own
            log.exception("request %s failed while processing %s", seq.request_id, what)
            self._deliver_failure(seq, exc)
            return False
        return True

    def _sample_row(self, logits: "torch.Tensor", seq: _Sequence) -> int:
        """Temperature / top-p sampling of one row ``(V,)`` with the sequence's generator."""
        torch = self._torch
        p = seq.params
        scores = logits.float().cpu() / float(p.temperature)
        probs = torch.softmax(scores, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            before = sorted_p.cumsum(0) - sorted_p          # mass strictly above each token
            sorted_p[before >= p.top_p] = 0.0               # keeps the smallest nucleus >= top_p
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _advance(self, seq: _Sequence, token: int) -> None:
        """Appends a token, updates text and finish state, and delivers the events."""
        now = time.perf_counter()
        seq.generated.append(token)
        first = seq.first_token_at is None
        if first:
            seq.first_token_at = now
        p = seq.params
        if token in self.eos_ids:
            seq.finish_reason = "stop"
        else:
            with self.tokenizer_lock:
                text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
            if p.stop:
                start = max(0, len(seq.text) - max(len(s) for s in p.stop) + 1)
                hits = [i for i in (text.find(s, start) for s in p.stop) if i >= 0]
                if hits:
                    text = text[:min(hits)]
                    seq.finish_reason = "stop"
            seq.text = text
        if seq.finish_reason is None and (len(seq.generated) >= p.max_tokens
                                          or seq.cache_len + 1 >= self.max_model_len):
            seq.finish_reason = "length"
        if first:
            with self.metrics.lock:
                self.metrics.ttft.observe(now - seq.submitted)
        if seq.finish_reason is not None:
            seq.done = True
            rest = seq.text[seq.emitted:]
            seq.emitted = len(seq.text)
            # Counted before the client can see the end, so metrics read after a response include it.
            with self.metrics.lock:
                c = self.metrics.counters
                c["finished"] += 1
                c["prompt_tokens"] += len(seq.prompt_ids)
                c["completion_tokens"] += len(seq.generated)
                self.metrics.finish_reasons[seq.finish_reason] += 1
                self.metrics.latency.observe(now - seq.submitted)
            if rest:
                self._deliver(seq, TextDelta(seq.request_id, rest, tuple(seq.generated[seq.sent_tokens:])))
            self._deliver(seq, Finished(seq.request_id, seq.text, tuple(seq.generated), seq.finish_reason,
                                        len(seq.prompt_ids), len(seq.generated)))
            return
        safe = _safe_length(seq.text, p.stop)
        if safe > seq.emitted:
            piece = seq.text[seq.emitted:safe]
            seq.emitted = safe
            tokens = tuple(seq.generated[seq.sent_tokens:])
            seq.sent_tokens = len(seq.generated)
            self._deliver(seq, TextDelta(seq.request_id, piece, tokens))

    def _deliver(self, seq: _Sequence, event: Event) -> None:
        seq.sink(event)

    def _deliver_failure(self, seq: _Sequence, error: BaseException) -> None:
        seq.done = True
        seq.finish_reason = "error"
        self.metrics.inc("failed")
        try:
            seq.sink(Failed(seq.request_id, error))
        except Exception:  # noqa: BLE001 - the client is gone; nothing else to do
            log.debug("could not deliver the failure of %s", seq.request_id, exc_info=True)


# ---------------------------------------------------------------------------------------- helpers
def _safe_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be sent now: not a trailing incomplete character (U+FFFD from a
    partial UTF-8 sequence) nor a trailing prefix of a stop string (it may complete later)."""
    n = len(text)
    while n > 0 and text[n - 1] == "\ufffd":
        n -= 1
    for k in range(min(n, max((len(s) for s in stops), default=1) - 1), 0, -1):
        tail = text[n - k:n]
        if any(s.startswith(tail) for s in stops):
            return n - k
    return n


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None)):
        if src is None:
            continue
        ids.update(int(x) for x in (src if isinstance(src, (list, tuple)) else [src]))
    return frozenset(ids)


def _pad_id(tokenizer: Any, eos_ids: frozenset[int]) -> int:
    """Any valid token id for padding positions (they are masked; the value never matters)."""
    for value in (getattr(tokenizer, "pad_token_id", None), min(eos_ids, default=None)):
        if isinstance(value, int) and value >= 0:
            return value
    return 0


def _check_attention(model: Any) -> None:
    cfg = getattr(model, "config", None)
    get_text = getattr(cfg, "get_text_config", None)
    text_cfg = get_text(decoder=True) if callable(get_text) else cfg
    types = getattr(text_cfg, "layer_types", None) or []
    odd = sorted({t for t in types if t != "full_attention"})
    if odd:
        raise ValueError(f"the serving engine supports full-attention decoders only; this model has "
                         f"{', '.join(odd)} layers")


def _cache_tensors(cache: Any) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
    """Per-layer ``(keys, values)`` of a transformers DynamicCache, each ``(B, H_kv, L, D)``."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers 4.x
