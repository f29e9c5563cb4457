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

import copy
from pathlib import Path

import torch

from causvid_core.cache import KVCache
from causvid_core.flow import FlowGrid

from ..config import TrainConfig
from ..losses import critic_loss, dmd_generator_loss, guided_x0
from ..run import StageRun, autocast
from ..sharding import clip_grad_norm, compute_dtype, is_sharded
from ..schedules import update_ema
from .common import (contrast_negatives, encode, grid_index, latent_shape, output, require, require_stage, run_prompts,
                     save_stage_dit, stage_dit, student_steps, teacher_path, text_source)
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
    gen = stage_dit(require(root, "ode-init") if sc.init == "ode-init" else teacher, sc.attention,
                    checkpointing=sc.checkpointing).to(dev)
    critic = r.shard(stage_dit(teacher, sc.attention, checkpointing=sc.checkpointing).to(dev), cfg.parallel)
    real_causal = sc.real_score == "causal-teacher"
    real = r.shard(stage_dit(require(root, "causal-teacher") if real_causal else teacher, sc.attention,
                             frozen=True).to(dev), cfg.parallel)
    ema = r.shard(copy.deepcopy(gen).eval().requires_grad_(False), cfg.parallel)
    gen = r.shard(gen, cfg.parallel)
    gen_dtype = compute_dtype(gen, cfg.parallel)
    opt_g = torch.optim.AdamW(gen.parameters(), lr=sc.lr, betas=(0.0, 0.999), weight_decay=sc.weight_decay)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=sc.lr_critic, betas=(0.0, 0.999), weight_decay=sc.weight_decay)
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
    from tqdm import tqdm
    for step in tqdm(range(start, sc.steps), initial=start, total=sc.steps, desc="dmd", disable=not r.is_main,
                     dynamic_ncols=True):
        with autocast(sc.autocast, r.acc.device):  # backward inside too: its ops follow the forward's dtypes
            (idx,) = r.local_indices(step, sc.batch)
            x0_data, prompts = data.batch(idx)
            x0_data = x0_data.to(dev)
            B, F = x0_data.shape[0], x0_data.shape[2]
            chunks = -(-F // chunk)
            cond, uncond = encode(text, prompts).to(dev), encode(text, [""] * B).to(dev)
            metrics = {}

            def make_x_gen() -> torch.Tensor:
                if sc.generator_input == "rollout":
                    exits = (r.rand(step, [0], (chunks,), purpose=5)[0] * len(steps)).long().clamp(max=len(steps) - 1)
                    noise = r.randn(step, idx, tuple(x0_data.shape[1:]), purpose=6).to(dev)
                    # re-noising drawn per sample (chunk c after step i), so any process count draws the same
                    return self_rollout(gen, noise, cond, steps, grid, chunk, exits.tolist(),
                                        lambda c, i, shape: r.randn(step, idx, shape[1:],
                                                                    purpose=RENOISE + c * len(steps) + i).to(dev),
                                        gen_dtype)
                return generate_from_data(gen, x0_data, r.randn(step, idx, tuple(x0_data.shape[1:]), purpose=6).to(dev),
                                          cond, steps, grid, chunk, r.rand(step, idx, (chunks,), purpose=5).to(dev))

            if step % sc.gen_every == 0:
                x_gen = make_x_gen()
                t = grid_index(grid, r.rand(step, idx, purpose=7), sc.t_min, sc.t_max).to(dev)
                x_t = grid.add_noise(x_gen.detach(), r.randn(step, idx, tuple(x_gen.shape[1:]), purpose=8).to(dev), t)
                with torch.no_grad():
                    tt = t.unsqueeze(1).expand(B, F) if real_causal else t
                    negatives = [n.to(dev) for n in contrast_negatives(text, prompts, sc.active_contrast,
                                                                       sc.contrast_words)]
                    x0_real = guided_x0(real, x_t, tt, cond, uncond, sc.guidance, grid,
                                        chunk_frames=chunk if real_causal else None, negatives=negatives,
                                        contrast=sc.active_contrast)
                    x0_fake = grid.flow_to_x0(critic(x_t, t, cond), x_t, t)
                loss_g = dmd_generator_loss(x_gen, x0_real, x0_fake)
                loss_g.backward()
                sync_grads(r.acc, gen)
                metrics["gen_grad_norm"] = clip_grad_norm(gen.parameters(), sc.grad_clip)
                opt_g.step()
                opt_g.zero_grad(set_to_none=True)
                update_ema(ema, gen, sc.ema if step >= sc.ema_start else 0.0)
                metrics["loss_dmd"] = loss_g.item()
            with torch.no_grad():
                x_gen = make_x_gen()
            t = grid_index(grid, r.rand(step, idx, purpose=9), sc.t_min, sc.t_max).to(dev)
            loss_c = critic_loss(critic, x_gen, r.randn(step, idx, tuple(x_gen.shape[1:]), purpose=10).to(dev), t,
                                 cond, grid)
            loss_c.backward()
            sync_grads(r.acc, critic)
            clip_grad_norm(critic.parameters(), sc.grad_clip)
            opt_c.step()
            opt_c.zero_grad(set_to_none=True)
            metrics["loss_critic"] = loss_c.item()
        if step % sc.log_every == 0 or step == sc.steps - 1:
            r.log(step, **r.mean(metrics))
        if (step + 1) % sc.ckpt_every == 0 and step + 1 < sc.steps:
            r.checkpoint(step + 1, objects)
    r.checkpoint(sc.steps, objects)
    save_stage_dit(r, ema, output(root, "dmd"))
    r.finish(model=str(output(root, "dmd")), steps=sc.steps, generator_input=sc.generator_input,
             real_score=sc.real_score, init=sc.init,
             contrast=sc.active_contrast)
