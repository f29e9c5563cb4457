"""Bidirectional flow-matching teacher on the VAE latents of Shapes World clips (or, in a user run, the user's
teacher fine-tuned on their video set), with condition
dropout (empty prompt) for classifier-free guidance. The saved teacher is the exponential moving
average of the weights (when `ema` > 0), trained at a learning rate that decays to zero from
`decay_from`: diffusion samples from raw weights at a constant rate are visibly noisier. The optional
teacher-refine stage (`refine`) trains the finished teacher further on a bigger clip set."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from causvid_core.flow import FlowGrid
from causvid_core.text import load_text_encoder
from causvid_core.vae import load_vae

from ..config import TrainConfig
from ..data import LatentSet, torus_roll
from ..losses import flow_matching_loss
from ..run import StageRun, train_steps
from ..schedules import lr_at, update_ema
from .common import (encode, grid_index, load_frozen, new_dit, output, require, require_stage, save_stage_dit,
                     stage_dit, stage_dits, text_source)

REFINE_LATENTS = "latents-refine.safetensors"  # the teacher-refine stage's bigger clip set


def latent_set(cfg: TrainConfig, root: Path, run: StageRun, num_clips: int | None = None,
               name: str = "latents.safetensors") -> LatentSet:
    """The first num_clips (default data.num_clips) clips of the data set, encoded once into root/name."""
    vae = load_frozen(require(root, "vae"), load_vae)
    return LatentSet.build(Path(root) / name, vae, cfg.data.seed, num_clips or cfg.data.num_clips,
                           cfg.data.clip_frames, is_main=run.is_main, wait=run.acc.wait_for_everyone)


def latent_batch(cfg: TrainConfig, run: StageRun, data: LatentSet, step: int, idx: list[int]
                 ) -> tuple[torch.Tensor, list[str]]:
    """The clips' latents and prompts, rolled on the torus when data.roll (purpose 4 of the step's draws)."""
    x0, prompts = data.batch(idx)
    if cfg.data.roll:
        x0 = torus_roll(x0, run.rand(step, idx, (2,), purpose=4))
    return x0, prompts


def check_roll(cfg: TrainConfig, root: Path) -> None:
    """data.roll is exact only for a VAE with circular padding: refuse it for any other."""
    padding = load_vae(require(root, "vae")).config.padding
    if cfg.data.roll and padding != "circular":
        raise ValueError(f"data.roll needs a VAE with circular padding (this run's has {padding!r}): set "
                         "vae.overrides.padding=circular, or data.roll=false")


def training_data(cfg: TrainConfig, root: Path, run: StageRun):
    """(text encoder, clips) of the stages that fine-tune a teacher: a user run's stored embeddings and video
    set (--videos), or the text stage's encoder and the Shapes World latent set."""
    if cfg.inputs.active:
        from ..userdata import VideoLatentSet

        if cfg.inputs.videos is None:
            raise ValueError(f"the {run.name} stage trains on videos: pass --videos (or set its steps to 0)")
        return text_source(cfg, root), VideoLatentSet(require_stage(root, "video-latents"))
    check_roll(cfg, root)
    return load_frozen(require(root, "text"), load_text_encoder), latent_set(cfg, root, run)


def flow_matching_batches(cfg: TrainConfig, run: StageRun, text, data):
    """The teacher's loss: flow matching on the shifted grid, prompts dropped (empty) for CFG."""
    sc = cfg.teacher
    grid = FlowGrid(sc.shift)

    def loss_fn(step: int, idx: list[int], m) -> tuple[torch.Tensor, dict]:
        x0, prompts = latent_batch(cfg, run, data, step, idx)
        drop = run.rand(step, idx, purpose=2) < sc.cond_dropout
        cond = encode(text, ["" if d else p for d, p in zip(drop.tolist(), prompts)])
        noise = run.randn(step, idx, tuple(x0.shape[1:]))
        t = grid_index(grid, run.rand(step, idx, purpose=3))
        dev = run.device  # drawn on the CPU (the same on every device), used where the model is
        return flow_matching_loss(m, x0.to(dev), noise.to(dev), t.to(dev), cond.to(dev), grid), {}

    return loss_fn


def run(cfg: TrainConfig, root: str | Path, accelerator=None) -> None:
    root = Path(root)
    r = StageRun(root, "teacher", cfg.seed, accelerator)
    if r.done:
        return
    sc = cfg.teacher
    loss_fn = flow_matching_batches(cfg, r, *training_data(cfg, root, r))
    if cfg.inputs.active:  # a user's teacher, fine-tuned on their clips (and its EMA, sharded as it loads)
        model, *emas = stage_dits(r, cfg.parallel, Path(cfg.inputs.teacher), sc.attention,
                                  (False, True) if sc.ema else (False,), checkpointing=sc.checkpointing)
        ema = emas[0] if emas else None
    else:
        model = new_dit(cfg, sc.attention)
        model.gradient_checkpointing = sc.checkpointing
        ema = r.shard(copy.deepcopy(model).eval().requires_grad_(False), cfg.parallel) if sc.ema else None
        model = r.shard(model, cfg.parallel)
    opt = torch.optim.AdamW(model.parameters(), lr=sc.lr, betas=(0.9, 0.999), weight_decay=sc.weight_decay)

    def after_step(step: int, weights=model) -> None:
        fresh = step < sc.ema_start or "ema" in r.missing  # a state saved before the EMA existed: start it here
        r.missing.discard("ema")
        update_ema(ema, weights, 0.0 if fresh else sc.ema)

    lr_fn = None if sc.decay_from is None else (lambda step: lr_at(step, sc.steps, sc.lr, decay_from=sc.decay_from))
    model = train_steps(r, sc, model, opt, loss_fn, extra_state={"ema": ema} if ema is not None else None,
                        after_step=after_step if ema is not None else None, optional_state=("ema",), lr_fn=lr_fn)
    save_stage_dit(r, model if ema is None else ema, output(root, "teacher"))
    r.finish(model=str(output(root, "teacher")), steps=sc.steps, ema=sc.ema, decay_from=sc.decay_from)


def refine(cfg: TrainConfig, root: str | Path, accelerator=None) -> None:
    """The teacher-refine stage (TeacherRefineStage): the finished teacher, trained on more clips."""
    root = Path(root)
    r = StageRun(root, "teacher-refine", cfg.seed, accelerator)
    if r.done:
        return
    sc = cfg.teacher_refine
    if sc.num_clips <= cfg.data.num_clips:
        raise ValueError(f"teacher_refine.num_clips ({sc.num_clips}) must exceed data.num_clips "
                         f"({cfg.data.num_clips}), the teacher's own clips: refining on them adds nothing")
    check_roll(cfg, root)
    text = load_frozen(require(root, "text"), load_text_encoder)
    loss_fn = flow_matching_batches(cfg, r, text, latent_set(cfg, root, r, sc.num_clips, REFINE_LATENTS))
    model = stage_dit(require(root, "teacher"), sc.attention, checkpointing=sc.checkpointing)
    ema = r.shard(copy.deepcopy(model).eval().requires_grad_(False), cfg.parallel)
    model = r.shard(model, cfg.parallel)
    opt = torch.optim.AdamW(model.parameters(), lr=sc.lr, betas=(0.9, 0.999), weight_decay=sc.weight_decay)
    model = train_steps(r, sc, model, opt, loss_fn, extra_state={"ema": ema},
                        after_step=lambda step, weights=model: update_ema(ema, weights, sc.ema),
                        lr_fn=lambda step: lr_at(step, sc.steps, sc.lr, warmup=sc.warmup))
    save_stage_dit(r, ema, output(root, "teacher-refine"))
    r.finish(model=str(output(root, "teacher-refine")), steps=sc.steps, num_clips=sc.num_clips, ema=sc.ema)
