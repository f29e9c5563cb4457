"""`causvid-train`: run one stage or the whole pipeline.

    causvid-train pipeline --preset micro --out runs/micro
    causvid-train teacher --preset shapes --out runs/shapes --set teacher.steps=4000
    causvid-train ablation --preset shapes --out runs/shapes   # the DMD variants of the paper's Table 4
    accelerate launch --multi_gpu --num_processes 2 -m trainer.cli teacher ...   # several processes (DDP);
    (on CPU: --multi_gpu with the CPU Accelerator gives gloo DDP; torchrun works too)

Every stage resumes from its last checkpoint when rerun with the same --out."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .config import PRESETS, apply_overrides, preset

STAGE_NAMES = ("vae", "vae-decoder", "text", "teacher", "causal-teacher", "ode-pairs", "ode-init", "dmd", "export", "pipeline", "ablation")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="causvid-train", description="Train CausVid-style causal students.")
    p.add_argument("stage", choices=STAGE_NAMES)
    p.add_argument("--preset", default="micro", choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="run folder (each stage writes a subfolder; reruns resume)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="override a config field, e.g. --set dmd.steps=200")
    p.add_argument("--stages", help="pipeline: comma list of stages to run (default: all)")
    p.add_argument("--variants", help="ablation: comma list of variants (default: all)")
    args = p.parse_args(argv)
    try:
        cfg = apply_overrides(preset(args.preset), args.set)
    except ValueError as exc:
        print(f"causvid-train: {exc}", file=sys.stderr)
        return 2
    from .pipeline import run_pipeline, run_stage
    if args.stage == "ablation":
        from .ablation import run_ablation
        try:
            run_ablation(cfg, args.out, args.variants.split(",") if args.variants else None)
        except (FileNotFoundError, ValueError) as exc:
            print(f"causvid-train: {exc}", file=sys.stderr)
            return 2
    elif args.stage == "pipeline":
        run_pipeline(cfg, args.out, stages=args.stages.split(",") if args.stages else None)
    else:
        run_stage(args.stage, cfg, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
