"""Argument types and checks shared by the ``edit-runtime`` sub-commands and the demo."""
from __future__ import annotations

import argparse
import re
from typing import NoReturn

__all__ = ["HelpFormatter", "RESIDUAL_ONLY_OPTIONS", "UsageExit", "csv_list", "gate_spec", "gates_by_delta",
           "given_flags", "int_list", "positive_int", "usage_error", "user_description"]

#: options only ``--method residual`` reads (``edit-runtime fit`` and the demo), as
#: (flag, argparse dest); each defaults to None so that a given value can be told apart
RESIDUAL_ONLY_OPTIONS = (("--harmless-weight", "harmless_weight"), ("--harmless-lang-weights", "harmless_lang_weights"),
                         ("--harmless-target", "harmless_target"), ("--hold-langs", "hold_langs"),
                         ("--hold-weight", "hold_weight"))


def csv_list(text: str) -> list[str]:
    """``"en, zh,,vi"`` -> ``["en", "zh", "vi"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def int_list(text: str) -> list[int]:
    """``"16,20"`` -> ``[16, 20]`` (layer numbers)."""
    try:
        return [int(t) for t in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def positive_int(text: str) -> int:
    """An int ≥ 1, or a clear argparse error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite float ≥ 0 (e.g. an edit's strength), or a clear argparse error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def lang_weights(text: str | None) -> dict[str, float]:
    """``"th=16,ar=8"`` -> ``{"th": 16.0, "ar": 8.0}`` (``--harmless-lang-weights``); exits naming
    a malformed item."""
    out: dict[str, float] = {}
    for item in csv_list(text) if text else []:
        lang, eq, value = item.partition("=")
        try:
            if not eq or not lang.strip():
                raise ValueError
            out[lang.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"--harmless-lang-weights: {item!r} is not LANG=WEIGHT (e.g. th=16,ar=16)") from None
    return out


def given_flags(args: argparse.Namespace, options: "tuple[tuple[str, str], ...]") -> list[str]:
    """The flags of ``options`` (``(flag, argparse dest)`` pairs whose default is None) that the
    command line gave, e.g. to refuse options another ``--method`` reads. A given ``0`` or empty
    value counts as given; a dest the parser does not define counts as not given."""
    return [flag for flag, dest in options if getattr(args, dest, None) is not None]


def gate_spec(text: str) -> tuple[str, str]:
    """``--gate NAME=PATH`` (``eval`` and ``serve``): the probe gate of the delta named NAME."""
    name, sep, path = text.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--gate expects NAME=PATH (NAME: a --delta's name), got {text!r}")
    return name, path


def gates_by_delta(gates: "list[tuple[str, str]]", delta_names: "list[str]") -> dict[str, str]:
    """``{delta name: gate path}`` of the ``--gate`` options; a second gate for one delta or a gate
    for no ``--delta`` raises ``ValueError``."""
    names = [n for n, _ in gates]
    if len(set(names)) != len(names):
        raise ValueError(f"one --gate per delta, got {names}")
    unknown = [n for n in names if n not in delta_names]
    if unknown:
        raise ValueError(f"--gate for unknown deltas {unknown}; deltas: {list(delta_names)}")
    return dict(gates)


# ------------------------------------------------------------------------------------- help text

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The sub-commands' help layout: the description keeps its line breaks (its examples stay
    readable) and an option's help ends with ``(default: X)`` when the option has a default worth
    showing (not None, a flag's False/True or an empty list) and its help does not already say
    what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text.lower() or default is None
                or default is argparse.SUPPRESS or isinstance(default, bool) or default == []):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


_RST_ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|exc|obj|ref):`~?([^`]*)`")
_RST_EMPHASIS = re.compile(r"(?<![\w*])\*{1,2}(\w[^*\n]*?)\*{1,2}(?![\w*])")  # *text*, **text**
# sentences of a module docstring that are notes for developers, not for users of the command
_IMPLEMENTATION_NOTES = (
    re.compile(r"[ \t]*\bOnly\s+argparse\s+is\s+imported\s+at\s+module\s+level\b[^.]*\.", re.S),
)


def user_description(doc: str) -> str:
    """A module docstring as a sub-command's ``--help`` description: Sphinx roles
    (``:func:`x``` -> ``x``), double backquotes and ``*emphasis*`` marks removed, implementation
    notes (which modules are imported when) dropped, trailing blanks trimmed."""
    text = _RST_EMPHASIS.sub(r"\1", _RST_ROLE.sub(r"\1", doc).replace("``", ""))
    for note in _IMPLEMENTATION_NOTES:
        text = note.sub("", text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


# ---------------------------------------------------------------------------------- usage errors

class UsageExit(SystemExit):
    """The exit of :func:`usage_error`: status 2 like ``parser.error``, and ``str()`` is the
    message (``SystemExit(2)`` alone would read ``"2"``), so callers and tests can match it."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """``parser.error(message)`` (usage and ``PROG: error: MESSAGE`` on stderr, exit status 2) for
    a mistake found after parsing, e.g. options that do not go together; raises :class:`UsageExit`."""
    try:
        parser.error(message)
    except SystemExit as exc:
        raise UsageExit(message, exc.code if isinstance(exc.code, int) else 2) from None
    raise UsageExit(message)  # pragma: no cover - parser.error always exits
