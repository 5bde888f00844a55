"""``edit-runtime serve``: an OpenAI-compatible HTTP server with per-request edits.

    edit-runtime serve --model smollm2-135m-instruct --delta safety=delta.safetensors \\
        --host 127.0.0.1 --port 8000

The request's ``model`` picks the weights: ``<served name>`` (the base model) or
``<served name>+<delta name>``. ``--merged`` folds the only delta into the weights (no runtime
cost; the base model is then not served). ``--gate NAME=PATH`` gives delta NAME a probe gate
(edit_runtime.gate): a request for that delta gets the edit only if the probe fires on its prompt,
and the base model's answer otherwise. Only argparse is imported at module level; torch,
transformers, FastAPI and uvicorn are imported when the command runs.
"""
from __future__ import annotations

import argparse

from edit_runtime.commands.argtypes import HelpFormatter, gate_spec, gates_by_delta, positive_int, user_description


def _delta_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--delta expects NAME=PATH, got {text!r}")
    if "+" in name:
        raise argparse.ArgumentTypeError(f"delta name {name!r} must not contain '+'")
    return name, path


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1-65535, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the ``serve`` sub-command."""
    p = sub.add_parser("serve", help="OpenAI-compatible server (chat/completions, streaming) with per-request edits",
                       description=user_description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="short name, HF folder, .gguf file or hub id")
    p.add_argument("--delta", action="append", type=_delta_spec, default=[], metavar="NAME=PATH",
                   help="a delta to offer as model '<served-name>+NAME' (repeatable)")
    p.add_argument("--gate", action="append", type=gate_spec, default=[], metavar="NAME=PATH",
                   help="a probe gate for delta NAME: the edit is on only for prompts the probe flags (repeatable)")
    p.add_argument("--merged", action="store_true",
                   help="merge the only delta into the weights (zero overhead; the base model is not offered)")
    p.add_argument("--served-model-name", default=None,
                   help="name of the base model in requests (default: the model's short name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port to listen on (1-65535)")
    p.add_argument("--max-batch-size", type=positive_int, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests before 503 queue_full")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="prompt + completion tokens (default: the model's max_position_embeddings)")
    p.add_argument("--allow-long-max-model-len", action="store_true",
                   help="accept a --max-model-len past the model's max_position_embeddings (untrained positions)")
    p.add_argument("--max-tokens-limit", type=positive_int, default=2048, help="largest max_tokens a request may ask")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype the model is loaded in")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-check-fingerprint", action="store_true",
                   help="accept deltas whose base-model fingerprint does not match")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="log level of the HTTP server (uvicorn)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Loads the model and deltas, starts the engine, serves until interrupted."""
    import logging

    import torch
    import uvicorn

    from edit_runtime.delta import SparseDelta
    from edit_runtime.gate import ProbeGate
    from edit_runtime.models import load_model
    from edit_runtime.serve.app import create_app
    from edit_runtime.serve.engine import EngineConfig, ServingEngine

    log = logging.getLogger("edit_runtime.serve")
    names = [n for n, _ in args.delta]
    if len(set(names)) != len(names):
        raise ValueError(f"delta names must be unique, got {names}")
    if args.merged and len(args.delta) != 1:
        raise ValueError(f"--merged needs exactly one --delta, got {len(args.delta)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    gate_paths = gates_by_delta(args.gate, names)
    if args.merged and gate_paths:
        raise ValueError("--merged folds the edit into the weights: it cannot be gated per request")
    if args.served_model_name is not None and ("+" in args.served_model_name or not args.served_model_name.strip()):
        raise ValueError(f"--served-model-name must be non-empty and without '+' (it separates the model from a "
                         f"delta name in requests), got {args.served_model_name!r}")
    # fail fast, before the model loads
    deltas = {name: SparseDelta.load(path) for name, path in args.delta}
    gates = {name: ProbeGate.load(path) for name, path in gate_paths.items()}
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    engine = ServingEngine(
        model, tokenizer, deltas,
        config=EngineConfig(max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                            max_model_len=args.max_model_len, max_tokens_limit=args.max_tokens_limit,
                            merged=args.merged, check_fingerprint=not args.no_check_fingerprint,
                            allow_long_max_model_len=args.allow_long_max_model_len),
        served_name=args.served_model_name, model_name_or_path=args.model, gates=gates,
    )
    app = create_app(engine, manage_engine=True)
    log.info("serving %s on http://%s:%d/v1", ", ".join(engine.model_names), args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
