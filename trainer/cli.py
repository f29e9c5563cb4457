"""`causvid-train`: the training stages. The stages themselves arrive with the trainer issue (5);
until then the command lists them and says so instead of pretending to train."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

STAGES = ("vae", "text", "teacher", "causal-teacher", "ode-pairs", "ode-init", "dmd", "export", "pipeline")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="causvid-train", description="Train CausVid-style causal students.")
    p.add_argument("stage", choices=STAGES)
    args, _ = p.parse_known_args(argv)
    print(f"causvid-train: stage {args.stage!r} is not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
