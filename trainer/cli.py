"""`causvid-train`: run one stage or the whole pipeline.

    causvid-train pipeline --preset micro --out runs/micro
    causvid-train teacher --preset shapes --out runs/shapes --set teacher.steps=4000
    causvid-train ablation --preset shapes --out runs/shapes   # the DMD variants of the paper's Table 4
    causvid-train results --preset shapes --out runs/shapes    # regenerate docs/RESULTS.md from the run
    causvid-train publish --preset shapes --out runs/shapes    # the run -> causvid_core/builtin/ (float16)
    causvid-train restore --preset shapes --out runs/new       # builtin VAE/text/teacher -> finished stages
    causvid-train restore --preset shapes --out runs/new --stages vae,text   # just these (the teacher trains anew)
    causvid-train diagnose --preset shapes --out runs/shapes   # where the teacher loses prompts (JSON)
    causvid-train lora --preset shapes --out runs/shapes --rank 32   # student - teacher as a ComfyUI LoRA
    causvid-train bench-memory --preset wan-1.3b --gpus 8 --set dmd.grad_accum=8   # per-GPU DMD memory (JSON)
    accelerate launch --multi_gpu --num_processes 2 -m trainer.cli teacher ...   # several processes (DDP);
    (on CPU: --multi_gpu with the CPU Accelerator gives gloo DDP; torchrun works too)

Every stage resumes from its last checkpoint when rerun with the same --out."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .config import PRESETS, apply_overrides, preset, validate

STAGE_NAMES = ("text-embeds", "video-latents", "vae", "vae-decoder", "text", "teacher", "teacher-refine", "causal-teacher", "ode-pairs", "ode-init",
               "dmd", "export", "lora", "pipeline", "ablation", "publish", "results", "restore", "diagnose",
               "bench-memory")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="causvid-train", description="Train CausVid-style causal students.")
    p.add_argument("stage", choices=STAGE_NAMES)
    p.add_argument("--preset", default="micro", choices=sorted(PRESETS))
    p.add_argument("--out", help="run folder (each stage writes a subfolder; reruns resume); required but for "
                                 "bench-memory")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="override a config field, e.g. --set dmd.steps=200")
    p.add_argument("--stages", help="pipeline: comma list of stages to run (default: all); restore: of stages to restore "
                                      "(default: vae, vae-decoder, text, teacher, teacher-refine)")
    p.add_argument("--variants", help="ablation: comma list of variants (default: all)")
    p.add_argument("--doc", help="results: the markdown file to write (default: docs/RESULTS.md of this checkout); "
                                 "plots and results.json go to results/ beside it")
    p.add_argument("--quick", action="store_true", help="results, diagnose: a few prompts and short streams (tests)")
    p.add_argument("--sigmas", help="diagnose: comma list of starting sigmas in [0, 1] (default 0,0.25,0.5,0.75,0.9,1)")
    p.add_argument("--dest", help="publish / restore: the built-in folder (default: causvid_core/builtin/)")
    p.add_argument("--note", help="publish: how the run departed from a straight run of its config (resumes with "
                                  "changed settings...), kept in PROVENANCE.json")
    p.add_argument("--rank", type=int, default=32, help="lora: the LoRA's rank (per layer, truncated SVD)")
    p.add_argument("--teacher", help="your teacher (any file `causvid info` reads: a Wan2.1 folder, a ComfyUI repack); "
                                     "lora: the base model (default: the run's teacher)")
    p.add_argument("--vae", help="your teacher's VAE (Wan2.1_VAE.pth or wan_2.1_vae.safetensors)")
    p.add_argument("--text-encoder", help="your text encoder (the Wan2.1 folder's umT5 with its tokenizer, ComfyUI's "
                                          "umt5 file, or ours)")
    p.add_argument("--prompts", help="the prompts to distil from: a prompt a line, JSONL or CSV")
    p.add_argument("--videos", help="a folder of videos with caption .txt files, or a CSV of path and caption: "
                                    "encoded once; lets DMD use them (--set dmd.generator_input=data)")
    p.add_argument("--student", help="lora: the fine-tuned model (default: the run's exported student)")
    p.add_argument("--gpus", type=int, default=8, help="bench-memory: the GPUs the DMD step is sharded over")
    p.add_argument("--size", help="bench-memory: WIDTHxHEIGHT of the clips in pixels (default: the preset's)")
    p.add_argument("--frames", type=int, help="bench-memory: pixel frames of a clip, 4k+1 (default: the preset's)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    if args.stage == "bench-memory":
        return _bench_memory(args)
    if args.out is None:
        p.error("the following arguments are required: --out")
    try:
        cfg = apply_overrides(preset(args.preset), args.set)
        if args.stage not in ("lora",):
            for name in ("vae", "text_encoder", "prompts", "videos"):
                if getattr(args, name) is not None:
                    setattr(cfg.inputs, name, str(getattr(args, name)))
            if args.teacher is not None:
                cfg.inputs.teacher = str(args.teacher)
        validate(cfg)  # before any run folder is made
        for name in ("teacher", "vae", "text_encoder", "prompts", "videos"):
            path = getattr(cfg.inputs, name)
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"--{name.replace('_', '-')} {path}: no such file or folder")
    except (ValueError, FileNotFoundError) as exc:
        print(f"causvid-train: {exc}", file=sys.stderr)
        return 2
    try:
        rc = _run(args, cfg)
        if _end_processes(together=True):
            _exit_launched(rc)
        return rc
    except KeyboardInterrupt:
        print("causvid-train: interrupted; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        from .run import StageStateError

        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, (StageStateError, FileNotFoundError, ValueError, RuntimeError, OSError)):
            detail = f"unexpected {type(exc).__name__}: {detail} (run with --debug for the traceback)"
        print(f"causvid-train: {detail}", file=sys.stderr)
        return 2 if isinstance(exc, (FileNotFoundError, ValueError)) else 1
    finally:
        _end_processes(together=False)


def _bench_memory(args) -> int:
    """The per-GPU memory of one DMD step of the preset at real size, as JSON (trainer/memory.py)."""
    from .config import loop_problems, parallel_problems
    from .memory import bench_dmd_memory

    try:
        cfg = apply_overrides(preset(args.preset), args.set)
        problems = parallel_problems(cfg) + loop_problems("dmd", cfg.dmd)
        if not isinstance(cfg.student.chunk_frames, int) or cfg.student.chunk_frames < 1:
            problems.append(f"student.chunk_frames must be a whole number >= 1, got {cfg.student.chunk_frames!r}")
        if problems:
            raise ValueError("; ".join(problems))
        size = args.size or f"{cfg.data.width}x{cfg.data.height}"
        width, sep, height = size.lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            raise ValueError(f"--size {size!r}: give WIDTHxHEIGHT, e.g. 832x480")
        if args.gpus < 1:
            raise ValueError(f"--gpus {args.gpus}: at least 1")
        result = bench_dmd_memory(cfg, gpus=args.gpus, size=(int(width), int(height)),
                                  frames=args.frames or cfg.data.clip_frames)
    except (ValueError, RuntimeError) as exc:
        if args.debug:
            raise
        print(f"causvid-train bench-memory: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def _end_processes(together: bool) -> bool:
    """Take down the process group a launcher set up; whether there was one. together: after a success, first
    wait for every process (never after a failure: the others may be waiting elsewhere)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    try:
        if together:
            dist.barrier()
    finally:
        dist.destroy_process_group()
    return True


def _exit_launched(rc: int) -> None:
    """A launched worker's exit once its work is written and every process is done: straight out, without the
    interpreter's teardown, in which gloo's communication threads can abort the process now and then
    (`terminate called without an active exception`, exit -6) after a run that succeeded."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _run(args, cfg) -> int:
    from causvid_core.pipeline import BUILTIN_DIR

    from .pipeline import run_pipeline, run_stage
    from .stages.common import teacher_stage
    if args.stage == "restore":
        from .publish import restore
        try:
            stages = args.stages.split(",") if args.stages else None
            print(json.dumps({"restored": restore(args.out, args.dest or BUILTIN_DIR, cfg, stages)}))
        except (FileNotFoundError, ValueError) as exc:
            print(f"causvid-train: {exc}", file=sys.stderr)
            return 2
    elif args.stage == "publish":
        from .publish import publish
        try:
            sizes = publish(args.out, args.dest or BUILTIN_DIR, teacher=teacher_stage(cfg), note=args.note)
        except (FileNotFoundError, ValueError) as exc:
            print(f"causvid-train: {exc}", file=sys.stderr)
            return 2
        print(json.dumps({"published": sizes, "total_mb": round(sum(sizes.values()) / 2**20, 2)}))
    elif args.stage == "ablation":
        from .ablation import run_ablation
        try:
            run_ablation(cfg, args.out, args.variants.split(",") if args.variants else None)
        except (FileNotFoundError, ValueError) as exc:
            print(f"causvid-train: {exc}", file=sys.stderr)
            return 2
    elif args.stage == "results":
        from .results import run_results
        try:
            run_results(cfg, args.out, args.doc, quick=args.quick)
        except (FileNotFoundError, ValueError) as exc:
            print(f"causvid-train: {exc}", file=sys.stderr)
            return 2
    elif args.stage == "diagnose":
        from .diagnose import DEFAULT_SIGMAS, renoise_sweep
        try:
            sigmas = [float(s) for s in args.sigmas.split(",")] if args.sigmas else DEFAULT_SIGMAS
            print(json.dumps(renoise_sweep(cfg, args.out, sigmas, quick=args.quick,
                                           log=lambda m: print(m, file=sys.stderr)), indent=2))
        except (FileNotFoundError, ValueError) as exc:
            print(f"causvid-train: {exc}", file=sys.stderr)
            return 2
    elif args.stage == "lora":
        from causvid_core.checkpoints import load_dit
        from causvid_core.lora_export import extract_lora, save_lora

        from .stages.common import require
        run = Path(args.out)
        teacher = Path(args.teacher) if args.teacher else require(run, teacher_stage(cfg))
        student = Path(args.student) if args.student else run / "student.safetensors"
        if not student.exists():
            raise FileNotFoundError(f"{student} is missing: run the export stage first, or pass --student")
        lora, report = extract_lora(load_dit(teacher).state_dict(), load_dit(student).state_dict(), args.rank)
        dest = run / f"lora_rank{args.rank}.safetensors"
        save_lora(lora, dest)
        print(report.line(), file=sys.stderr)
        print(json.dumps({"lora": str(dest), "rank": args.rank, "layers": report.layers,
                          "rel_error": round(report.rel_error, 6), "rel_error_linear": round(report.rel_error_linear, 6),
                          "left_out": round(report.left_out, 6)}))
    elif args.stage == "pipeline":
        run_pipeline(cfg, args.out, stages=args.stages.split(",") if args.stages else None)
    else:
        run_stage(args.stage, cfg, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
