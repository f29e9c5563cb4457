"""Asymmetric distribution matching distillation (CausVid), with Self-Forcing's self-rollout option.

generator = the causal few-step student (from ODE init, or the teacher for the ablation);
real score = the frozen teacher with guidance (bidirectional, or the causal teacher for the ablation);
fake score = a trainable copy of the teacher (the critic), updated every step; the generator every
`gen_every` steps; an EMA of the generator is what gets exported.

Generator input: "data" (CausVid): data latents noised per chunk to a random step of the student's
list, one block-causal pass to x0; "rollout" (Self-Forcing): the student's own KV-cached rollout from
noise, with gradient through one random step per chunk and none through the cached past.
Gradients are averaged across processes by hand (the generator runs several forwards per step), or, under
parallel.strategy=fsdp, by FSDP's reduce-scatter of each sharded DiT."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from causvid_core.cache import KVCache
from causvid_core.flow import FlowGrid

from ..config import DMDStage, TrainConfig
from ..losses import critic_loss, dmd_generator_loss, guided_x0
from ..run import StageRun, autocast
from ..sharding import clip_grad_norm, compute_dtype, is_sharded
from ..schedules import update_ema
from .common import (contrast_negatives, encode, grid_index, latent_shape, output, require, require_stage, run_prompts,
                     save_stage_dit, stage_dits, student_steps, teacher_path, text_source)
from .teacher import latent_set

RENOISE = 100  # the first draw purpose of the rollout's re-noising (0-10 are the step's other draws)


def sync_grads(acc, model: torch.nn.Module) -> None:
    """The mean gradient over the processes (DDP's all-reduce, by hand); FSDP reduced a sharded model's."""
    if acc.num_processes == 1 or is_sharded(model):
        return
    for p in model.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= acc.num_processes


def generate_from_data(gen, x0_data, noise, cond, steps, grid, chunk, u) -> torch.Tensor:
    """CausVid: each chunk of the data noised to a random student step; one block-causal pass to x0."""
    F = x0_data.shape[2]
    k = (u * len(steps)).long().clamp(max=len(steps) - 1)  # [B, chunks]
    t = torch.tensor(steps, dtype=torch.float32, device=k.device)[k].repeat_interleave(chunk, dim=1)[:, :F]  # [B, F]
    x_t = grid.add_noise(x0_data, noise, t)
    return grid.flow_to_x0(gen(x_t, t, cond, chunk_frames=chunk), x_t, t)


def self_rollout(gen, noise, cond, steps, grid, chunk, exits, renoise, dtype: torch.dtype) -> torch.Tensor:
    """Self-Forcing: the student's cached rollout; chunk c stops at step exits[c] with gradient. dtype: the
    generator's compute dtype (its KV cache's)."""
    B, _, F, h, w = noise.shape
    cache = KVCache.full(gen.config, batch=B, tokens_per_frame=gen.config.tokens_per_frame(h, w), frames=F,
                         dtype=dtype, device=noise.device)
    outs = []
    for c, s in enumerate(range(0, F, chunk)):
        x = noise[:, :, s:s + chunk]
        f = x.shape[2]
        for i in range(exits[c] + 1):
            t = torch.full((B, f), float(steps[i]), device=noise.device)
            with torch.set_grad_enabled(i == exits[c]):
                x0 = grid.flow_to_x0(gen(x, t, cond, cache=cache, start_frame=s), x, t)
            if i < exits[c]:
                x = grid.add_noise(x0, renoise(c, i, x.shape).to(x0), float(steps[i + 1]))
        with torch.no_grad():
            gen(x0.detach(), torch.zeros(B, f, device=noise.device), cond, cache=cache, start_frame=s)
        outs.append(x0)
    return torch.cat(outs, dim=2)


@dataclass
class Draws:
    """Everything random in one micro-batch of a DMD step, drawn on the host from (seed, step, sample) (the
    StageRun's draws), so any device and any number of processes draws the same."""
    noise: torch.Tensor  # [B, C, F, h, w] the generator's noise (purpose 6)
    steps_u: torch.Tensor  # [B, chunks] data input: each chunk's step (purpose 5)
    exits: list[int]  # rollout: each chunk's exit step, shared by the batch (purpose 5 of sample 0)
    t_gen: torch.Tensor  # [B] the generator loss's timesteps (7) and noise (8)
    noise_gen: torch.Tensor
    t_critic: torch.Tensor  # [B] the critic's (9, 10)
    noise_critic: torch.Tensor
    renoise: dict = field(default_factory=dict)  # rollout: (chunk, step) -> [B, C, f, h, w] (RENOISE + ...)

    def to(self, device) -> "Draws":
        """On the device, copied once per micro-batch (from pinned memory, without waiting, on a GPU)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if torch.device(device).type == "cuda" and torch.cuda.is_available():
                return t.pin_memory().to(device, non_blocking=True)
            return t.to(device)

        return Draws(noise=move(self.noise), steps_u=move(self.steps_u), exits=self.exits, t_gen=move(self.t_gen),
                     noise_gen=move(self.noise_gen), t_critic=move(self.t_critic),
                     noise_critic=move(self.noise_critic), renoise={k: move(v) for k, v in self.renoise.items()})

    @classmethod
    def draw(cls, src, sc: DMDStage, grid: FlowGrid, steps: list[float], chunk: int, step: int, idx: list[int],
             shape: tuple[int, ...]) -> "Draws":
        """shape: one sample's latent [C, F, h, w]; src: anything with StageRun's rand / randn."""
        C, F, h, w = shape
        chunks, S = -(-F // chunk), len(steps)
        exits = (src.rand(step, [0], (chunks,), purpose=5)[0] * S).long().clamp(max=S - 1).tolist()
        renoise = {}
        if sc.generator_input == "rollout":  # chunk c leaves step i < exits[c] re-noised, per sample
            for c, s in enumerate(range(0, F, chunk)):
                for i in range(exits[c]):
                    renoise[c, i] = src.randn(step, idx, (C, min(chunk, F - s), h, w), purpose=RENOISE + c * S + i)
        return cls(noise=src.randn(step, idx, shape, purpose=6), steps_u=src.rand(step, idx, (chunks,), purpose=5),
                   exits=exits, renoise=renoise,
                   t_gen=grid_index(grid, src.rand(step, idx, purpose=7), sc.t_min, sc.t_max),
                   noise_gen=src.randn(step, idx, shape, purpose=8),
                   t_critic=grid_index(grid, src.rand(step, idx, purpose=9), sc.t_min, sc.t_max),
                   noise_critic=src.randn(step, idx, shape, purpose=10))


@dataclass
class MicroBatch:
    """One micro-batch's inputs on the device."""
    draws: Draws
    cond: torch.Tensor  # [B, L, D]
    uncond: torch.Tensor  # [B, L, D]
    data: Optional[torch.Tensor] = None  # [B, C, F, h, w] data latents (the data-noised generator input)
    negatives: list = field(default_factory=list)  # contrast guidance: K x [B, L, D]


class DMDStep:
    """The device work of one DMD step over its micro-batches: the generator's update (every gen_every-th
    step; gradients accumulated over the micro-batches), its EMA, then the critic's. The stage runs it on
    real data; `causvid-train bench-memory` on fake tensors at real size."""

    def __init__(self, sc: DMDStage, chunk: int, steps: list[float], grid: FlowGrid, gen, critic, real, ema,
                 opt_g, opt_c, gen_dtype: torch.dtype, real_causal: bool, acc=None):
        self.sc, self.chunk, self.steps, self.grid = sc, chunk, steps, grid
        self.gen, self.critic, self.real, self.ema, self.opt_g, self.opt_c = gen, critic, real, ema, opt_g, opt_c
        self.gen_dtype, self.real_causal, self.acc = gen_dtype, real_causal, acc

    def x_gen(self, mb: MicroBatch) -> torch.Tensor:
        d, dev = mb.draws, mb.cond.device
        if self.sc.generator_input == "rollout":
            return self_rollout(self.gen, d.noise.to(dev), mb.cond, self.steps, self.grid, self.chunk, d.exits,
                                lambda c, i, shape: d.renoise[c, i].to(dev), self.gen_dtype)
        return generate_from_data(self.gen, mb.data, d.noise.to(dev), mb.cond, self.steps, self.grid, self.chunk,
                                  d.steps_u.to(dev))

    def generator_loss(self, mb: MicroBatch) -> torch.Tensor:
        sc, grid, dev = self.sc, self.grid, mb.cond.device
        x_gen = self.x_gen(mb)
        B, F = x_gen.shape[0], x_gen.shape[2]
        t = mb.draws.t_gen.to(dev)
        x_t = grid.add_noise(x_gen.detach(), mb.draws.noise_gen.to(dev), t)
        with torch.no_grad():
            tt = t.unsqueeze(1).expand(B, F) if self.real_causal else t
            x0_real = guided_x0(self.real, x_t, tt, mb.cond, mb.uncond, sc.guidance, grid,
                                chunk_frames=self.chunk if self.real_causal else None, negatives=mb.negatives,
                                contrast=sc.active_contrast)
            x0_fake = grid.flow_to_x0(self.critic(x_t, t, mb.cond), x_t, t)
        return dmd_generator_loss(x_gen, x0_real, x0_fake)

    def critic_loss(self, mb: MicroBatch) -> torch.Tensor:
        dev = mb.cond.device
        with torch.no_grad():
            x_gen = self.x_gen(mb)
        return critic_loss(self.critic, x_gen, mb.draws.noise_critic.to(dev), mb.draws.t_critic.to(dev), mb.cond,
                           self.grid)

    def __call__(self, step: int, micro: list[MicroBatch]) -> dict[str, torch.Tensor]:
        """One step; its metrics as 0-dim tensors (read on the host only when logged)."""
        sc, metrics = self.sc, {}
        if step % sc.gen_every == 0:
            metrics["loss_dmd"] = self._update(self.gen, self.opt_g, self.generator_loss, micro, metrics,
                                               "gen_grad_norm")
            update_ema(self.ema, self.gen, sc.ema if step >= sc.ema_start else 0.0)
        metrics["loss_critic"] = self._update(self.critic, self.opt_c, self.critic_loss, micro, metrics, None)
        return metrics

    def _update(self, model, opt, loss_fn, micro: list[MicroBatch], metrics: dict, norm_key) -> torch.Tensor:
        total = 0.0
        for mb in micro:  # FSDP reduce-scatters each micro-batch's gradients (see train_steps)
            loss = loss_fn(mb)
            (loss / len(micro)).backward()
            total = total + loss.detach() / len(micro)
        if self.acc is not None:
            sync_grads(self.acc, model)
        norm = clip_grad_norm(model.parameters(), self.sc.grad_clip)
        if norm_key:
            metrics[norm_key] = norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total


def optimizers(sc: DMDStage, gen, critic) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """The generator's and the critic's AdamW (made after sharding: FSDP replaces the parameters)."""
    opt_g = torch.optim.AdamW(gen.parameters(), lr=sc.lr, betas=(0.0, 0.999), weight_decay=sc.weight_decay)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=sc.lr_critic, betas=(0.0, 0.999), weight_decay=sc.weight_decay)
    return opt_g, opt_c


def run(cfg: TrainConfig, root: str | Path, accelerator=None) -> None:
    root = Path(root)
    r = StageRun(root, "dmd", cfg.seed, accelerator)
    if r.done:
        return
    sc, chunk = cfg.dmd, cfg.student.chunk_frames
    shift, steps = student_steps(cfg)
    grid = FlowGrid(shift)
    text = text_source(cfg, root)
    teacher = teacher_path(cfg, root)
    dev = r.device
    real_causal = sc.real_score == "causal-teacher"
    def load(path: Path, frozen: tuple[bool, ...]) -> list:
        return stage_dits(r, cfg.parallel, path, sc.attention, frozen, checkpointing=sc.checkpointing)

    gen, ema = load(require(root, "ode-init") if sc.init == "ode-init" else teacher, (False, True))
    (critic,) = load(teacher, (False,))
    (real,) = load(require(root, "causal-teacher") if real_causal else teacher, (True,))
    opt_g, opt_c = optimizers(sc, gen, critic)
    dmd = DMDStep(sc, chunk, steps, grid, gen, critic, real, ema, opt_g, opt_c, compute_dtype(gen, cfg.parallel),
                  real_causal, r.acc)
    if cfg.inputs.videos is not None:  # the user's clips: CausVid's data-noised generator input works
        from ..userdata import VideoLatentSet
        data = VideoLatentSet(require_stage(root, "video-latents"))
    elif cfg.inputs.active:  # prompts only: the rollout generator needs the clips' shape, no data
        from ..userdata import PromptSet
        data = PromptSet(run_prompts(cfg), latent_shape(cfg, gen.config))
    else:
        data = latent_set(cfg, root, r)
    objects = {"generator": gen, "critic": critic, "ema": ema, "opt_g": opt_g, "opt_c": opt_c}
    start = r.resume(objects)

    def micro_batch(step: int, idx: list[int]) -> MicroBatch:
        x0_data, prompts = data.batch(idx)
        return MicroBatch(
            draws=Draws.draw(r, sc, grid, steps, chunk, step, idx, tuple(x0_data.shape[1:])).to(dev),
            cond=encode(text, prompts).to(dev), uncond=encode(text, [""] * len(idx)).to(dev), data=x0_data.to(dev),
            negatives=[n.to(dev) for n in contrast_negatives(text, prompts, sc.active_contrast, sc.contrast_words)])

    from tqdm import tqdm
    for step in tqdm(range(start, sc.steps), initial=start, total=sc.steps, desc="dmd", disable=not r.is_main,
                     dynamic_ncols=True):
        micro = [micro_batch(step, idx) for idx in r.local_indices(step, sc.batch, sc.grad_accum)]
        with autocast(sc.autocast, r.acc.device):  # backward inside too: its ops follow the forward's dtypes
            metrics = dmd(step, micro)
        if step % sc.log_every == 0 or step == sc.steps - 1:
            r.log(step, **r.mean({k: float(v) for k, v in metrics.items()}))
        if (step + 1) % sc.ckpt_every == 0 and step + 1 < sc.steps:
            r.checkpoint(step + 1, objects)
    r.checkpoint(sc.steps, objects)
    save_stage_dit(r, ema, output(root, "dmd"))
    r.finish(model=str(output(root, "dmd")), steps=sc.steps, generator_input=sc.generator_input,
             real_score=sc.real_score, init=sc.init,
             contrast=sc.active_contrast)
