"""The ``edit-runtime`` command.

Each sub-command lives in a small ``_cmd_*`` function that imports what it needs, so
``edit-runtime --help`` stays fast and a missing optional dependency only breaks its own command.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

Command = Callable[[argparse.Namespace], int]


def _cmd_models(args: argparse.Namespace) -> int:
    from edit_runtime import models

    if args.action == "prepare":
        names = args.names or list(models.KNOWN_MODELS)
        for name in names:
            path = models.ensure_cached(name)
            print(f"{name}: {path}")
    else:  # list
        for name, spec in models.KNOWN_MODELS.items():
            print(f"{name}\t{spec.description if hasattr(spec, 'description') else ''}")
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list or prepare (convert and cache) the wheel-shipped models")
    p.add_argument("action", choices=["list", "prepare"])
    p.add_argument("names", nargs="*", help="short names (default: all known models)")
    p.set_defaults(func=_cmd_models)


_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [_add_models]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edit-runtime",
        description="Find safety neurons, fit closed-form sparse low-rank edits, apply and serve them.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging (-vv: also show tracebacks)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Library errors already name the offending value; a traceback adds nothing for a user.
        if args.verbose > 1:
            raise
        print(f"edit-runtime {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
