"""Prompt data: loaders, one record type, deterministic splits, a dataset hash, chat rendering.

Every source becomes a list of :class:`Prompt` records::

    Prompt(id="multijail:17", lang="bn", text="...", label="harmful", source="multijail", meta={...})

Entry point: :func:`load_prompts`. It sniffs the format from the source's name or extension:

============================  ==========================================================  =========
source                        format                                                       label
============================  ==========================================================  =========
``builtin:harmful``           the project's own parallel set (``edit_runtime/prompts``)   harmful
``builtin:harmless``          idem                                                         harmless
``builtin`` / ``builtin:all`` both                                                         both
``…/MultiJail.csv``           MultiJail, one column per language (en zh it vi ar ko th     harmful
                              bn sw jv); ids ``multijail:<row id>``
``…/harmbench_behaviors*.csv`` HarmBench; ``standard`` behaviours only unless               harmful
                              ``functional_categories=`` says otherwise; ids
                              ``harmbench:<BehaviorID>``
``…/harmful_behaviors.csv``   AdvBench ``goal`` column; ids ``advbench:<0-based row>``     harmful
``…/mgsm_<lang>.tsv`` or dir  MGSM, line-parallel; ids ``mgsm:<0-based line>``;           harmless
                              ``meta["answer"]`` is the integer answer
``…/xcopa`` dir or            XCOPA premises, parallel by ``idx``; ids                     harmless
``…/<split>.<lang>.jsonl``    ``xcopa:<test|val>:<idx>``; choices/label in ``meta``
``…/alpaca_*.json``           alpaca-style ``[{instruction, input, output}]``; text is    harmless
                              ``instruction`` (+ ``"\\n" + input``); ids
                              ``alpaca_<lang>:<index>``; exact duplicate texts dropped
``*.jsonl`` / ``*.csv``       generic: ``text_field=`` names the text column (default:    ``label=``
                              the first of text, prompt, instruction, goal, question,
                              query) or, with no text column, one column per language
                              code ("wide", like MultiJail)
``hf:<dataset id>``           Hugging Face hub through ``datasets`` (optional, needs      ``label=``
                              network); rows go through the generic path
============================  ==========================================================  =========

Short names ``multijail``, ``harmbench``, ``advbench``, ``mgsm``, ``xcopa``, ``alpaca`` (and
``alpaca_en`` / ``alpaca_zh``) resolve inside the shared data folder (:func:`shared_data_dir`:
``$EDIT_RUNTIME_SHARED_DATA``, else the nearest ``shared/data`` above the working directory or
this package). ``format=`` overrides sniffing (one of :data:`FORMATS`). In generic files a
column named ``id`` is the id column (never Indonesian); a ``*.json`` array of objects that is
not an alpaca file goes through the generic path too. Ids are prefixed with the source (the
file stem for generic files, ``id_prefix=`` to override) so two sets never share an id by
accident; :func:`by_id` lines up the translations of each id.

Splits
------
The split of a prompt depends only on its id, never on its language, so the parallel
translations of one prompt (which share the id) always fall in the same split and a prompt
can never leak from fitting into evaluation through another language. The exact rule::

    h = sha256(("edit_runtime-split-v1:" + id).encode("utf-8")).digest()
    u = int.from_bytes(h[:8], "big") / 2**64          # uniform in [0, 1)
    split = "train" if u < 0.50 else "validation" if u < 0.65 else "test"

i.e. 50 % train, 15 % validation, 35 % test in expectation (:data:`SPLIT_SALT`,
:data:`SPLIT_BOUNDS`). Test gets 35 % rather than 33 % so that, hash noise included, at least
a third of the MultiJail ids are held out (with 33 % this salt would give only 99 of 315).
The id string is used exactly as stored in :attr:`Prompt.id` (``"multijail:17"``, ``"h001"``),
so the same rule serves fitting (``split="train"``),
threshold/strength selection (``"validation"``) and reporting (``"test"``). Realised counts
(train / validation / test ids), checked by the tests: MultiJail 315 -> 160 / 47 / 108 (34.3 %
test); builtin harmful 40 -> 16 / 5 / 19, builtin harmless 200 -> 129 / 27 / 44; AdvBench 520 ->
271 / 71 / 178; HarmBench standard 200 -> 99 / 30 / 71; MGSM 250 -> 116 / 48 / 86.

Hash
----
:func:`dataset_hash` is the sha256 of the canonical JSON (sorted keys, no spaces, UTF-8,
``ensure_ascii=False``) of the list ``[[id, lang, label, text], ...]`` sorted, so it does not
depend on the order of the prompts. Use it in cache keys and reports.
"""
from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

__all__ = [
    "Prompt",
    "DataSourceError",
    "FORMATS",
    "LABELS",
    "SPLITS",
    "SPLIT_SALT",
    "SPLIT_BOUNDS",
    "MULTIJAIL_LANGS",
    "MGSM_LANGS",
    "XCOPA_LANGS",
    "BUILTIN_LANGS",
    "load_prompts",
    "split_of",
    "filter_split",
    "dataset_hash",
    "by_lang",
    "by_id",
    "parallel_ids",
    "first_ids",
    "shared_data_dir",
    "builtin_dir",
    "render_chat",
    "render_chats",
]

LABELS = ("harmful", "harmless")
SPLITS = ("train", "validation", "test")
SPLIT_SALT = "edit_runtime-split-v1"
#: upper bounds of the uniform variable u for train and validation; the rest is test.
SPLIT_BOUNDS = (0.50, 0.65)

MULTIJAIL_LANGS = ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv")
MGSM_LANGS = ("en", "es", "fr", "de", "ru", "zh", "ja", "th", "sw", "bn", "te")
XCOPA_LANGS = ("et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh")
BUILTIN_LANGS = ("en", "zh", "vi", "th", "bn", "sw", "fr", "ar")

FORMATS = (
    "builtin", "multijail", "harmbench", "advbench", "mgsm", "xcopa", "alpaca", "jsonl", "csv",
    "json", "hf",
)

# Language codes recognised as column names in "wide" files (one column per language).
_LANG_CODES = frozenset(
    "af am ar az be bg bn bs ca cs cy da de el en es et eu fa fi fr ga gl gu ha he hi hr ht hu "
    "hy id ig is it ja jv ka kk km kn ko ky lo lt lv mk ml mn mr ms mt my ne nl no pa pl ps pt "
    "qu ro ru si sk sl so sq sr su sv sw ta te tg th tl tr uk ur uz vi xh yo zh zu".split()
)
_TEXT_FIELDS = ("text", "prompt", "instruction", "goal", "question", "query")

_SHORT_NAMES = {
    "multijail": "multijail/MultiJail.csv",
    "harmbench": "harmbench/harmbench_behaviors_text_all.csv",
    "advbench": "advbench/harmful_behaviors.csv",
    "mgsm": "mgsm",
    "xcopa": "xcopa",
    "alpaca": "alpaca_demo_llamafactory",
    "alpaca_en": "alpaca_demo_llamafactory/alpaca_en_demo.json",
    "alpaca_zh": "alpaca_demo_llamafactory/alpaca_zh_demo.json",
}


class DataSourceError(ValueError):
    """A source could not be found, sniffed or parsed (the message says which and why)."""


@dataclass(frozen=True)
class Prompt:
    """One prompt in one language.

    ``id`` is shared by the parallel translations of the same prompt and alone decides the
    split (:func:`split_of`). ``label`` is ``"harmful"`` or ``"harmless"``. ``source`` names
    the data set (``"multijail"``, ``"builtin"``, ...); ``meta`` holds source-specific fields
    (tags, categories, answers) and takes no part in equality or hashing.
    """

    id: str
    lang: str
    text: str
    label: str
    source: str
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"Prompt.label must be one of {LABELS}, got {self.label!r}")

    @property
    def split(self) -> str:
        return split_of(self.id)

    def to_dict(self) -> dict:
        return {
            "id": self.id, "lang": self.lang, "text": self.text, "label": self.label,
            "source": self.source, "meta": dict(self.meta),
        }


# --------------------------------------------------------------------------------------------
# splits and hashing
# --------------------------------------------------------------------------------------------

def _split_u(id_: str) -> float:
    h = hashlib.sha256(f"{SPLIT_SALT}:{id_}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def split_of(id_: str) -> str:
    """``"train"``, ``"validation"`` or ``"test"`` for a prompt id (see the module docstring)."""
    u = _split_u(str(id_))
    if u < SPLIT_BOUNDS[0]:
        return "train"
    if u < SPLIT_BOUNDS[1]:
        return "validation"
    return "test"


def _norm_split(split: str | Sequence[str] | None) -> frozenset[str] | None:
    if split is None:
        return None
    names = [split] if isinstance(split, str) else list(split)
    out = set()
    for s in names:
        s = {"val": "validation", "dev": "validation", "valid": "validation"}.get(s, s)
        if s == "all":
            return None
        if s not in SPLITS:
            raise ValueError(f"unknown split {s!r}; expected one of {SPLITS} or 'all'")
        out.add(s)
    return frozenset(out)


def filter_split(prompts: Iterable[Prompt], split: str | Sequence[str] | None) -> list[Prompt]:
    """Keep the prompts whose id falls in ``split`` (a name, a list of names, ``None``/"all")."""
    wanted = _norm_split(split)
    return [p for p in prompts if wanted is None or split_of(p.id) in wanted]


def dataset_hash(prompts: Iterable[Prompt]) -> str:
    """sha256 hex of the canonical JSON of the sorted ``[id, lang, label, text]`` list."""
    rows = sorted([p.id, p.lang, p.label, p.text] for p in prompts)
    blob = json.dumps(rows, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def by_lang(prompts: Iterable[Prompt]) -> dict[str, list[Prompt]]:
    """Group prompts by language, keeping their order."""
    out: dict[str, list[Prompt]] = {}
    for p in prompts:
        out.setdefault(p.lang, []).append(p)
    return out


def by_id(prompts: Iterable[Prompt]) -> dict[str, dict[str, Prompt]]:
    """``{id: {lang: Prompt}}``: the parallel translations of each prompt side by side (e.g. a
    low-resource prompt and its English original for the edit's targets)."""
    out: dict[str, dict[str, Prompt]] = {}
    for p in prompts:
        if p.lang in out.setdefault(p.id, {}):
            raise ValueError(f"duplicate prompt id {p.id!r} in language {p.lang!r}")
        out[p.id][p.lang] = p
    return out


def parallel_ids(prompts: Iterable[Prompt], langs: Sequence[str] | None = None) -> list[str]:
    """Ids present in every language of ``langs`` (default: every language seen), in order."""
    groups = by_lang(prompts)
    langs = list(groups) if langs is None else list(langs)
    if not langs:
        return []
    sets = [{p.id for p in groups.get(lang, [])} for lang in langs]
    common = set.intersection(*sets)
    seen: set[str] = set()
    out = []
    for p in groups.get(langs[0], []):
        if p.id in common and p.id not in seen:
            seen.add(p.id)
            out.append(p.id)
    return out


def first_ids(prompts: Iterable[Prompt], limit: int | None) -> list[Prompt]:
    """The prompts of the first ``limit`` ids in sorted id order (``None``/0: all), in their order.

    Whole ids, not prompts, so that parallel sources keep every language of an id.
    """
    prompts = list(prompts)
    if not limit:
        return prompts
    keep = set(sorted({p.id for p in prompts})[:limit])
    return [p for p in prompts if p.id in keep]


# --------------------------------------------------------------------------------------------
# locating files
# --------------------------------------------------------------------------------------------

def builtin_dir() -> Path:
    """Folder of the project's own prompt set (package data ``edit_runtime/prompts``)."""
    return Path(__file__).resolve().parent / "prompts"


def shared_data_dir(required: bool = False) -> Path | None:
    """The shared data folder: ``$EDIT_RUNTIME_SHARED_DATA``, else the nearest ``shared/data``
    found walking up from the working directory and from this file. ``None`` when absent
    (or :class:`DataSourceError` with ``required=True``)."""
    env = os.environ.get("EDIT_RUNTIME_SHARED_DATA")
    if env:
        p = Path(env).expanduser()
        if p.is_dir():
            return p
        if required:
            raise DataSourceError(f"EDIT_RUNTIME_SHARED_DATA={env!r} is not a directory")
        return None
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        for d in (start, *start.parents):
            cand = d / "shared" / "data"
            if cand.is_dir():
                return cand
    if required:
        raise DataSourceError(
            "shared data folder not found: set EDIT_RUNTIME_SHARED_DATA or pass a file path")
    return None


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------

def load_prompts(
    source: str | os.PathLike,
    *,
    langs: Sequence[str] | str | None = None,
    split: str | Sequence[str] | None = None,
    limit: int | None = None,
    format: str | None = None,
    label: str | None = None,
    **options: Any,
) -> list[Prompt]:
    """Load prompts from ``source`` (see the module docstring for names and formats).

    ``langs`` keeps only those languages (a language a source lacks is an error, so a typo
    cannot silently give an empty set). ``split`` keeps ids in that split (:func:`split_of`).
    ``limit`` keeps the first ``limit`` distinct ids (after the split filter) in every
    language, so the result stays parallel. ``label`` sets or overrides the label (required
    for generic and ``hf:`` sources without a usable ``label`` column). Format options:

    * generic / hf: ``text_field``, ``id_field`` (default ``"id"`` when present, else the row
      index), ``lang_field`` (default ``"lang"`` when present), ``lang`` (language of a
      single-language file, default ``"en"``), ``label_field``, ``wide`` (force one column per
      language), ``id_prefix`` (default the file stem).
    * harmbench: ``functional_categories`` (default ``("standard",)``; ``None`` = all rows).
    * xcopa: ``xcopa_split`` = ``"test"`` (default), ``"val"`` or ``"both"``.
    * alpaca: ``lang`` (default from the file name ``alpaca_<lang>_demo.json``), ``dedupe``
      (default True).
    * hf: ``hf_config``, ``hf_split`` (default ``"train"``), plus the generic options.
    """
    if isinstance(langs, str):
        langs = [langs]
    if label is not None and label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    fmt, target = _resolve(source, format)
    loader = _LOADERS[fmt]
    prompts = loader(target, langs=langs, label=label, **options)
    if langs is not None:
        wanted = set(langs)
        prompts = [p for p in prompts if p.lang in wanted]
    prompts = filter_split(prompts, split)
    if limit is not None:
        keep: list[str] = []
        seen: set[str] = set()
        for p in prompts:
            if p.id not in seen:
                seen.add(p.id)
                keep.append(p.id)
        keep_set = set(keep[:limit])
        prompts = [p for p in prompts if p.id in keep_set]
    return prompts


def _resolve(source: str | os.PathLike, fmt: str | None) -> tuple[str, Any]:
    s = os.fspath(source)
    if fmt is not None and fmt not in FORMATS:
        raise DataSourceError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if s.startswith("builtin"):
        which = s.partition(":")[2] or "all"
        if which not in ("harmful", "harmless", "all"):
            raise DataSourceError(
                f"unknown builtin set {s!r}; use builtin:harmful, builtin:harmless or builtin")
        return "builtin", which
    if s.startswith("hf:"):
        return "hf", s[3:]
    path = Path(s).expanduser()
    if not path.exists() and s in _SHORT_NAMES:
        root = shared_data_dir(required=True)
        path = root / _SHORT_NAMES[s]
    if not path.exists():
        if s in _SHORT_NAMES:  # the short name resolved into the shared folder, which lacks it
            raise DataSourceError(
                f"data source not found: {s!r} is {path} in the shared data folder, which does not hold "
                "it (set EDIT_RUNTIME_SHARED_DATA to the folder that does, or pass the file's path)")
        raise DataSourceError(
            f"data source not found: {s!r} is neither a file nor a folder, nor one of the short names "
            f"({', '.join(sorted(_SHORT_NAMES))}), builtin[:harmful|:harmless] or hf:<id>")
    return (fmt or _sniff(path)), path


def _sniff(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        if (path / "MultiJail.csv").exists():
            return "multijail"
        if list(path.glob("mgsm_*.tsv")):
            return "mgsm"
        if (path / "data").is_dir() and list((path / "data").glob("*/test.*.jsonl")):
            return "xcopa"
        if list(path.glob("*/test.*.jsonl")):
            return "xcopa"
        if list(path.glob("alpaca_*.json")):
            return "alpaca"
        raise DataSourceError(f"cannot tell the format of directory {str(path)!r}")
    if "multijail" in name and name.endswith(".csv"):
        return "multijail"
    if "harmbench" in name and name.endswith(".csv"):
        return "harmbench"
    if ("harmful_behaviors" in name or "advbench" in name) and name.endswith(".csv"):
        return "advbench"
    if name.startswith("mgsm") and name.endswith(".tsv"):
        return "mgsm"
    if name.endswith(".jsonl"):
        if "xcopa" in str(path).lower() or re.fullmatch(r"(test|val)\.[a-z]{2}\.jsonl", name):
            return "xcopa"
        return "jsonl"
    if name.endswith(".json"):
        return "alpaca" if "alpaca" in name else "json"
    if name.endswith(".csv"):
        return "csv"
    raise DataSourceError(
        f"cannot tell the format of {str(path)!r} from its name; pass format= one of {FORMATS}")


# --------------------------------------------------------------------------------------------
# loaders
# --------------------------------------------------------------------------------------------

def _check_langs(requested: Sequence[str] | None, available: Iterable[str], what: str) -> None:
    if requested is None:
        return
    avail = set(available)
    missing = [lang for lang in requested if lang not in avail]
    if missing:
        raise DataSourceError(
            f"{what} has no language(s) {missing}; available: {sorted(avail)}")


def _read_csv(path: Path, encoding: str = "utf-8-sig") -> list[dict[str, str]]:
    with open(path, encoding=encoding, newline="") as f:
        return list(csv.DictReader(f))


def _label(default: str, override: str | None) -> str:
    return override if override is not None else default


def _load_builtin(which: str, *, langs=None, label=None, **_: Any) -> list[Prompt]:
    files = {"harmful": ["harmful.jsonl"], "harmless": ["harmless.jsonl"],
             "all": ["harmful.jsonl", "harmless.jsonl"]}[which]
    out: list[Prompt] = []
    for fname in files:
        path = builtin_dir() / fname
        if not path.exists():
            raise DataSourceError(
                f"builtin prompt file missing: {path} (is edit_runtime/prompts installed as "
                "package data?)")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
        # "id" is the id column, never Indonesian
        lang_cols = [k for k in rows[0] if k in _LANG_CODES and k != "id"]
        _check_langs(langs, lang_cols, f"builtin:{fname.split('.')[0]}")
        for r in rows:
            meta = {k: v for k, v in r.items() if k not in lang_cols and k not in ("id", "label")}
            for lang in lang_cols:
                out.append(Prompt(r["id"], lang, r[lang], _label(r["label"], label), "builtin",
                                  meta))
    return out


def _load_multijail(path: Path, *, langs=None, label=None, **_: Any) -> list[Prompt]:
    if path.is_dir():
        path = path / "MultiJail.csv"
    rows = _read_csv(path)
    if not rows:
        return []
    lang_cols = [c for c in rows[0] if c in _LANG_CODES and c != "id"]
    _check_langs(langs, lang_cols, "MultiJail")
    out = []
    for r in rows:
        try:
            tags = list(ast.literal_eval(r.get("tags") or "[]"))
        except (ValueError, SyntaxError):
            tags = [r.get("tags")]
        meta = {"row_id": int(r["id"]), "origin": r.get("source"), "tags": tags}
        for lang in lang_cols:
            out.append(Prompt(f"multijail:{r['id']}", lang, r[lang].strip(),
                              _label("harmful", label), "multijail", meta))
    return out


def _load_harmbench(path: Path, *, langs=None, label=None,
                    functional_categories: Sequence[str] | None = ("standard",),
                    **_: Any) -> list[Prompt]:
    _check_langs(langs, ["en"], "HarmBench")
    out = []
    for r in _read_csv(path):
        if (functional_categories is not None
                and r["FunctionalCategory"] not in functional_categories):
            continue
        meta = {k: r[k] for k in
                ("FunctionalCategory", "SemanticCategory", "Tags", "ContextString")}
        out.append(Prompt(f"harmbench:{r['BehaviorID']}", "en", r["Behavior"].strip(),
                          _label("harmful", label), "harmbench", meta))
    return out


def _load_advbench(path: Path, *, langs=None, label=None, **_: Any) -> list[Prompt]:
    _check_langs(langs, ["en"], "AdvBench")
    return [Prompt(f"advbench:{i}", "en", r["goal"].strip(), _label("harmful", label), "advbench",
                   {"row": i, "target": r.get("target")})
            for i, r in enumerate(_read_csv(path))]


def _load_mgsm(path: Path, *, langs=None, label=None, **_: Any) -> list[Prompt]:
    if path.is_dir():
        files = {f.stem.split("_", 1)[1]: f for f in sorted(path.glob("mgsm_*.tsv"))}
    else:
        files = {path.stem.split("_", 1)[1] if "_" in path.stem else "en": path}
    _check_langs(langs, files, "MGSM")
    out = []
    for lang, f in files.items():
        if langs is not None and lang not in langs:
            continue
        # Raw TSV without quoting: split each line on its last tab (see SOURCE.md).
        lines = f.read_text(encoding="utf-8").split("\n")
        for i, line in enumerate(x for x in lines if x.strip()):
            q, _, a = line.rpartition("\t")
            meta = {"line": i, "answer": int(a.strip().replace(",", ""))}
            out.append(Prompt(f"mgsm:{i}", lang, q.strip(), _label("harmless", label), "mgsm",
                              meta))
    return out


def _load_xcopa(path: Path, *, langs=None, label=None, xcopa_split: str = "test",
                **_: Any) -> list[Prompt]:
    if xcopa_split not in ("test", "val", "both"):
        raise ValueError("xcopa_split must be 'test', 'val' or 'both'")
    fsplits = ("test", "val") if xcopa_split == "both" else (xcopa_split,)
    if path.is_dir():
        root = path / "data" if (path / "data").is_dir() else path
        files = {}
        for fs in fsplits:
            for f in sorted(root.glob(f"*/{fs}.*.jsonl")):
                files[(fs, f.name.split(".")[1])] = f
    else:
        root = path.parent.parent
        fs, lg = path.name.split(".")[:2]
        files = {(fs, lg): path}
    _check_langs(langs, {lg for _, lg in files}, "XCOPA")
    # The `question` field is unreliable in some languages (th, tr, sw, ...): take it from the
    # zh file (else et) of the same split, joined by idx, when that file is there.
    ref_q: dict[tuple[str, int], str] = {}
    for fs in {fs for fs, _ in files}:
        for ref in ("zh", "et"):
            f = root / ref / f"{fs}.{ref}.jsonl"
            if f.exists():
                for line in f.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        r = json.loads(line)
                        ref_q[(fs, int(r["idx"]))] = r["question"]
                break
    out = []
    for (fs, lang), f in files.items():
        if langs is not None and lang not in langs:
            continue
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            idx = int(r["idx"])
            meta = {"idx": idx, "file_split": fs, "choice1": r["choice1"], "choice2": r["choice2"],
                    "question": ref_q.get((fs, idx), r["question"]), "answer": int(r["label"]),
                    "changed": r.get("changed")}
            out.append(Prompt(f"xcopa:{fs}:{idx}", lang, r["premise"].strip(),
                              _label("harmless", label), "xcopa", meta))
    return out


def _load_alpaca(path: Path, *, langs=None, label=None, lang: str | None = None,
                 dedupe: bool = True, **_: Any) -> list[Prompt]:
    files = sorted(path.glob("alpaca_*.json")) if path.is_dir() else [path]
    per_file = []
    for f in files:
        m = re.match(r"alpaca_([a-z]{2})", f.name)
        per_file.append((lang or (m.group(1) if m else "en"), f))
    _check_langs(langs, [lg for lg, _ in per_file], "alpaca")
    out = []
    for lg, f in per_file:
        if langs is not None and lg not in langs:
            continue
        data = json.loads(f.read_text(encoding="utf-8"))
        seen: set[str] = set()
        for i, r in enumerate(data):
            text = r["instruction"].strip()
            if (r.get("input") or "").strip():
                text += "\n" + r["input"].strip()
            if dedupe and text in seen:
                continue
            seen.add(text)
            out.append(Prompt(f"alpaca_{lg}:{i}", lg, text, _label("harmless", label), "alpaca",
                              {"index": i, "file": f.name}))
    return out


def _rows_to_prompts(rows: Sequence[Mapping[str, Any]], *, source: str, id_prefix: str,
                     langs=None, label=None, text_field: str | None = None,
                     id_field: str | None = None, lang_field: str | None = None,
                     lang: str = "en", label_field: str | None = None,
                     wide: bool | None = None) -> list[Prompt]:
    """Generic rows (dicts) -> prompts: long format (a text column) or wide (a column per
    language)."""
    if not rows:
        return []
    cols = list(rows[0].keys())
    if id_field is None and "id" in cols:
        id_field = "id"
    if lang_field is None and "lang" in cols:
        lang_field = "lang"
    if label_field is None and "label" in cols:
        label_field = "label"
    if text_field is None and not wide:
        text_field = next((c for c in _TEXT_FIELDS if c in cols), None)
    # a column named like a language code is a language column unless it is the id/lang/label/
    # text column ("id" is the id column when present, never Indonesian)
    lang_cols = [c for c in cols if c in _LANG_CODES
                 and c not in (id_field, lang_field, label_field, text_field)]
    if wide is None:
        wide = text_field is None and bool(lang_cols)
    if not wide and text_field is None:
        raise DataSourceError(
            f"{source}: no text column found among {cols}; pass text_field=")
    if not wide and text_field not in cols:
        raise DataSourceError(f"{source}: text_field {text_field!r} not in columns {cols}")

    def row_label(r: Mapping[str, Any]) -> str:
        if label is not None:
            return label
        if label_field is not None and r.get(label_field) in LABELS:
            return r[label_field]
        raise DataSourceError(
            f"{source}: no usable label (column {label_field!r} missing or not in {LABELS}); "
            "pass label='harmful' or label='harmless'")

    skip = {id_field, lang_field, label_field, text_field, *lang_cols}
    out = []
    for i, r in enumerate(rows):
        rid = f"{id_prefix}:{r[id_field] if id_field else i}"
        meta = {k: v for k, v in r.items() if k not in skip}
        if wide:
            for lg in lang_cols:
                if r.get(lg) is None or str(r[lg]).strip() == "":
                    continue
                out.append(Prompt(rid, lg, str(r[lg]).strip(), row_label(r), source, meta))
        else:
            lg = str(r[lang_field]) if lang_field else lang
            out.append(Prompt(rid, lg, str(r[text_field]).strip(), row_label(r), source, meta))
    _check_langs(langs, {p.lang for p in out}, source)
    return out


def _load_jsonl(path: Path, *, id_prefix: str | None = None, **kw: Any) -> list[Prompt]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8-sig").splitlines()
            if line.strip()]
    return _rows_to_prompts(rows, source=path.stem, id_prefix=id_prefix or path.stem, **kw)


def _load_json(path: Path, *, id_prefix: str | None = None, **kw: Any) -> list[Prompt]:
    rows = json.loads(path.read_text(encoding="utf-8-sig"))
    if not isinstance(rows, list):
        raise DataSourceError(f"{path}: expected a JSON array of objects")
    return _rows_to_prompts(rows, source=path.stem, id_prefix=id_prefix or path.stem, **kw)


def _load_csv(path: Path, *, id_prefix: str | None = None, **kw: Any) -> list[Prompt]:
    return _rows_to_prompts(_read_csv(path), source=path.stem, id_prefix=id_prefix or path.stem,
                            **kw)


def _load_hf(dataset_id: str, *, hf_config: str | None = None, hf_split: str = "train",
             id_prefix: str | None = None, **kw: Any) -> list[Prompt]:
    try:
        import datasets  # type: ignore
    except ImportError as e:
        raise DataSourceError(
            f"hf:{dataset_id} needs the optional `datasets` package, which is not installed "
            "(pip install datasets; it also needs network access to the Hugging Face hub). "
            "Alternatively download the file and pass its path.") from e
    try:
        ds = datasets.load_dataset(dataset_id, hf_config, split=hf_split)
    except Exception as e:  # network, auth, missing dataset
        raise DataSourceError(
            f"could not load hf:{dataset_id} (config={hf_config!r}, split={hf_split!r}) through "
            f"`datasets`: is the hub reachable from here? ({type(e).__name__}: {e})") from e
    rows = [dict(r) for r in ds]
    return _rows_to_prompts(rows, source=f"hf:{dataset_id}",
                            id_prefix=id_prefix or f"hf:{dataset_id}", **kw)


_LOADERS = {
    "builtin": _load_builtin,
    "multijail": _load_multijail,
    "harmbench": _load_harmbench,
    "advbench": _load_advbench,
    "mgsm": _load_mgsm,
    "xcopa": _load_xcopa,
    "alpaca": _load_alpaca,
    "jsonl": _load_jsonl,
    "json": _load_json,
    "csv": _load_csv,
    "hf": _load_hf,
}


# --------------------------------------------------------------------------------------------
# chat rendering
# --------------------------------------------------------------------------------------------

def render_chat(tokenizer: Any, text: str, system: str | None = None) -> str:
    """The model's chat prompt for one user turn, ending with the assistant header.

    Calls ``tokenizer.apply_chat_template(messages, add_generation_prompt=True,
    tokenize=False)``. With ``system`` a system message comes first; a template that rejects
    the system role (e.g. Gemma's) gets the system text prepended to the user turn instead.
    """
    if getattr(tokenizer, "chat_template", "") is None:
        raise ValueError(
            "tokenizer has no chat_template; set tokenizer.chat_template or use an instruct model")
    messages = [{"role": "user", "content": text}]
    if system is not None:
        try:
            return _apply(tokenizer, [{"role": "system", "content": system}, *messages])
        except Exception as e:  # noqa: BLE001 - jinja raises TemplateError subclasses
            if "system" not in str(e).lower():
                raise
            messages = [{"role": "user", "content": f"{system}\n\n{text}"}]
    return _apply(tokenizer, messages)


def _apply(tokenizer: Any, messages: list[dict]) -> str:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not isinstance(out, str):
        raise TypeError(f"apply_chat_template returned {type(out).__name__}, expected str")
    return out


def render_chats(tokenizer: Any, texts: Iterable[str] | Iterable[Prompt],
                 system: str | None = None) -> list[str]:
    """:func:`render_chat` over a list of strings or :class:`Prompt` records."""
    return [render_chat(tokenizer, t.text if isinstance(t, Prompt) else t, system) for t in texts]


def iter_texts(prompts: Iterable[Prompt]) -> Iterator[str]:
    for p in prompts:
        yield p.text
