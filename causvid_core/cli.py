"""`causvid`: parity, bench, info (generate and stream arrive with the sampler issue)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def _latent_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"latent size must look like 32x32, got {text!r}") from None
    return h, w


def _print_json(result: dict, compact: bool) -> None:
    print(json.dumps(result) if compact else json.dumps(result, indent=2), flush=True)


def cmd_parity(args: argparse.Namespace) -> int:
    from .parity import run_parity

    try:
        ok = run_parity(args.file, only=args.only)
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as exc:
        print(f"causvid parity: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    return 0 if ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "model":
        from .bench import bench_model

        result = bench_model(args.preset or "wan2.1-t2v-1.3b", latent_hw=args.latent, frames=args.frames,
                             chunk=args.chunk, repeats=args.repeats)
    elif args.what == "vae":
        from .vae_bench import bench_vae

        result = bench_vae(args.preset or "shapes")
    else:  # argparse restricts the choices
        raise AssertionError(args.what)
    _print_json(result, args.json)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints import CheckpointError, load_dit

    try:
        model = load_dit(args.path)
    except CheckpointError as exc:
        print(f"causvid info: {exc}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    _print_json({"kind": "dit", "layout": model.checkpoint_layout, "params": n,
                 "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                 "config": model.config.to_dict()}, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="causvid", description="Streaming causal video generation (CausVid on Wan2.1).")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("parity", help="reproduce the reference implementations' outputs stored in a parity file")
    q.add_argument("file", help="NAME.json (NAME.safetensors must lie beside it)")
    q.add_argument("--only", choices=("dit", "vae"), help="run only the DiT or only the VAE cases")
    q.set_defaults(func=cmd_parity)

    b = sub.add_parser("bench", help="benchmarks printing one JSON line")
    b.add_argument("what", choices=("model", "vae"))
    b.add_argument("--preset", help="model preset (default: wan2.1-t2v-1.3b for model, shapes for vae)")
    b.add_argument("--latent", type=_latent_size, default=(32, 32), help="latent HxW (model bench)")
    b.add_argument("--frames", type=int, default=21, help="stream length in latent frames (model bench)")
    b.add_argument("--chunk", type=int, default=3, help="frames per chunk (model bench)")
    b.add_argument("--repeats", type=int, default=2, help="timed repeats, best kept (model bench)")
    b.add_argument("--json", action="store_true", help="one compact JSON line")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="recognise a checkpoint and print its layout and config")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
