"""The main job for now: the runtime benchmark tables on this machine, in one run.

1. a patched Linear at the Qwen-0.5B and Llama-3-8B ``up_proj`` shapes (bare Linear vs patched,
   with and without a row mask, vs dense-merged vs PEFT-style unmerged LoRA), tokens 1/8/128/512;
2. a decode step of the real Qwen model, unpatched vs patched vs merged.

    python bench/runtime_table.py [--quick] [--threads N] [--min-time S]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_decode  # noqa: E402
import bench_lowrank_apply  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="Qwen shape only, tokens 1 and 128")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of interleaved rounds per apply point (more = less noise)")
    args = p.parse_args(argv)
    t0 = time.time()
    op_args = ["--shapes", "qwen0.5b-up", "--tokens", "1", "128"] if args.quick else []
    if args.threads:
        op_args += ["--threads", str(args.threads)]
    if args.min_time:
        op_args += ["--min-time", str(args.min_time)]
    bench_lowrank_apply.main(op_args)
    print()
    bench_decode.main(["--rounds", "10" if args.quick else "30"]
                      + (["--threads", str(args.threads)] if args.threads else []))
    print(f"\n(total {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
