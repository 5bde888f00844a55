"""``edit-runtime export``: a delta as a PEFT LoRA adapter, or folded into a full checkpoint.

    edit-runtime export peft delta.safetensors --model smollm2-135m-instruct -o adapter/
    edit-runtime export merged delta.safetensors --model smollm2-135m-instruct -o merged/

``peft`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` (scale 1, full-name
``target_modules``), loadable by ``peft.PeftModel.from_pretrained`` and servable by vLLM
(``--enable-lora --lora-modules NAME=DIR --max-lora-rank R``), SGLang (``--lora-paths
NAME=DIR``) and TGI (``LORA_ADAPTERS=NAME=DIR``). ``merged`` writes a plain safetensors
checkpoint (+ tokenizer) with the edit in the weights. Several DELTA files stack in order.
Only argparse is imported at module level.
"""
from __future__ import annotations

import argparse

from edit_runtime.commands.argtypes import HelpFormatter, positive_int, user_description


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


PEFT_DESCRIPTION = """\
Write the deltas (several stack in order) as a PEFT LoRA adapter folder: adapter_config.json and
adapter_model.safetensors, loadable by peft.PeftModel.from_pretrained and servable by vLLM,
SGLang and TGI; the command prints the serve command lines.

example:
  edit-runtime export peft delta.safetensors --model smollm2-135m-instruct -o adapter/"""

MERGED_DESCRIPTION = """\
Fold the deltas (several stack in order) into the base model's weights and write a plain
safetensors checkpoint with its tokenizer, loadable like any Hugging Face folder.

example:
  edit-runtime export merged delta.safetensors --model smollm2-135m-instruct -o merged/"""


def register(sub: argparse._SubParsersAction) -> None:
    """Adds ``export peft`` and ``export merged``."""
    p = sub.add_parser("export", help="export a delta as a PEFT LoRA adapter (vLLM/SGLang/TGI) or a merged checkpoint",
                       description=user_description(__doc__), formatter_class=HelpFormatter,
                       epilog="Run edit-runtime export KIND --help for the options of each kind.")
    kinds = p.add_subparsers(dest="export_kind", required=True, metavar="KIND")

    peft = kinds.add_parser("peft", help="PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)",
                            description=PEFT_DESCRIPTION, formatter_class=HelpFormatter)
    _common(peft)
    peft.add_argument("--max-rank", type=positive_int, default=None,
                      help="truncate modules of higher rank by exact SVD (reports the relative Frobenius error)")
    peft.add_argument("--max-rel-error", type=_fraction, default=None,
                      help="refuse a truncation whose relative Frobenius error exceeds this (e.g. 0.01)")
    peft.add_argument("--rank-layout", choices=["pad", "pattern"], default="pad",
                      help="pad every module to the largest rank with zeros (pad, the default) or give each "
                           "module its own rank with PEFT's rank_pattern (pattern)")
    peft.add_argument("--no-pair-gate-up", dest="pair_gate_up", action="store_false",
                      help="do not add zero LoRAs on gate_proj/up_proj siblings (SGLang needs them)")
    peft.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                      help="dtype of the saved factors (default: the delta's)")
    peft.add_argument("--base-model-name-or-path", default=None,
                      help="value of base_model_name_or_path in adapter_config.json (default: the model's folder/id)")
    peft.set_defaults(func=run_peft)

    merged = kinds.add_parser("merged", help="full safetensors checkpoint with the edit folded into the weights",
                              description=MERGED_DESCRIPTION, formatter_class=HelpFormatter)
    _common(merged)
    merged.set_defaults(func=run_merged)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("delta", nargs="+", metavar="DELTA", help="delta file(s); several stack in order")
    p.add_argument("--model", required=True, help="short name, HF folder, .gguf file or hub id (the base model)")
    p.add_argument("-o", "--output", required=True, help="output folder (created atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no-check-fingerprint", action="store_true",
                   help="accept deltas whose base-model fingerprint does not match")


def run_peft(args: argparse.Namespace) -> int:
    import json

    from edit_runtime.export import PROVENANCE_NAME, export_peft

    out = export_peft(args.delta, args.model, args.output, base_model_name_or_path=args.base_model_name_or_path,
                      max_rank=args.max_rank, max_rel_error=args.max_rel_error, rank_layout=args.rank_layout,
                      pair_gate_up=args.pair_gate_up, dtype=args.dtype,
                      check_fingerprint=not args.no_check_fingerprint, overwrite=args.overwrite)
    info = json.loads((out / PROVENANCE_NAME).read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    print(f"wrote PEFT LoRA adapter {out}: r={info['r']} (lora_alpha={config['lora_alpha']}), "
          f"{len(info['modules'])} module(s)")
    for path, m in info["modules"].items():
        note = " (zero pair)" if m["zero_pair"] else ""
        trunc = f", truncated from {m['source_rank']}, rel. Frobenius error {m['rel_error']:.3g}" \
            if m["rel_error"] > 0 or m["source_rank"] > m["rank"] else ""
        print(f"  {path}: rank {m['rank']}{trunc}{note}")
    base = config.get("base_model_name_or_path") or "<base model folder>"
    vllm_rank = info.get("vllm_max_lora_rank")
    if vllm_rank is None:
        print(f"rank {info['r']} exceeds vLLM's largest --max-lora-rank 512: re-export with --max-rank")
    else:
        print(f"serve with vLLM:  vllm serve {base} --enable-lora --lora-modules safety={out} "
              f"--max-lora-rank {vllm_rank}")
    print(f"serve with SGLang: python -m sglang.launch_server --model-path {base} --enable-lora "
          f"--lora-paths safety={out} --max-lora-rank {info['r']}")
    return 0


def run_merged(args: argparse.Namespace) -> int:
    from edit_runtime.export import export_merged

    out = export_merged(args.delta, args.model, args.output, check_fingerprint=not args.no_check_fingerprint,
                        overwrite=args.overwrite)
    print(f"wrote merged checkpoint {out}: load it like any Hugging Face folder "
          f"(AutoModelForCausalLM.from_pretrained, vllm serve {out})")
    return 0
