"""`causvid-train bench-memory`: the per-GPU memory of one DMD step at real size, measured without a GPU.

The step is the stage's own (trainer.stages.dmd.DMDStep: the generator's update through the real score and
the critic, its EMA, then the critic's update, over the micro-batches of one GPU) on fake tensors: the real
architectures of the run's DiT preset, sharded by FSDP2 over `gpus` processes of a fake process group (this
process plays rank 0; collectives move no data but allocate what they would), built on the meta device and
materialised as fake tensors, so nothing of the real size is ever allocated. causvid_core.fakedevice's
MemoryTracker counts every live tensor: the resident model states, then the step's peak.

DiT attention is counted as the flash kernel (no attention matrix), as causvid_core/memory.py explains.
Not counted: the CUDA context, NCCL's buffers and the caching allocator's fragmentation (leave 10-15%).
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch

from causvid_core.fakedevice import FakeDevice, MemoryTracker, build_on_meta
from causvid_core.flow import FlowGrid
from causvid_core.memory import GIB, flash_attention
from causvid_core.model import WanDiT

from .config import TrainConfig
from .run import SampleDraws, autocast
from .sharding import compute_dtype, is_sharded, mesh_for, shard
from .stages.common import dit_config, student_steps


class _Rank:
    """Rank 0 of `world` fake processes, with what optimizers needs of a StageRun."""

    def __init__(self, world: int, device: str = "cpu"):
        self.world, self.device = world, torch.device(device)
        # before fake mode: a mesh is made of real tensors
        self.mesh = mesh_for(world, self.device) if world > 1 else None


    def shard(self, model, parallel):
        return shard(model, parallel, self.world, self.device, self.mesh)


def _local_bytes(tensors) -> int:
    """Bytes the tensors take on this process: its shard of each sharded one."""
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _materialise(model, fd: FakeDevice) -> None:
    """A meta-built model's weights as fake tensors on the fake device: FSDP's sharded ones by to_empty, an
    unsharded model's by FakeDevice.module (to_empty cannot swap a plain module's meta parameters for fake ones)."""
    if is_sharded(model):
        model.to_empty(device=fd.device)
    else:
        training = model.training
        fd.module(model).train(training)  # module() leaves it in eval mode


def bench_dmd_memory(cfg: TrainConfig, gpus: int = 8, size: tuple[int, int] = (832, 480), frames: int = 81,
                     real_device: Optional[str] = None, attention=flash_attention) -> dict:
    """Peak bytes on one GPU of a DMD step of `cfg` (its dmd batch, grad_accum, checkpointing and parallel
    settings) on `gpus` GPUs. size = (width, height) in pixels, frames: pixel frames (4k+1).
    real_device: run the step for real there instead (one process, small sizes: what checks the fake
    accounting); attention: the DiT's kernel (the flash kernel's op by default, as CUDA runs it)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from .stages.dmd import DMDStep, Draws, MicroBatch, optimizers

    sc, dcfg = cfg.dmd, dit_config(cfg)
    width, height = size
    if width % 16 or height % 16 or (frames - 1) % 4 or width < 16 or height < 16 or frames < 1:
        raise ValueError(f"size must be multiples of 16 and frames 4k+1, got {width}x{height}, {frames} frames")
    micro = sc.batch // (gpus * sc.grad_accum)
    if micro < 1 or sc.batch % (gpus * sc.grad_accum):
        raise ValueError(f"dmd.batch {sc.batch} must be a multiple of gpus x dmd.grad_accum = {gpus} x {sc.grad_accum}:"
                         f" set dmd.grad_accum (or dmd.batch)")
    launched = dist.is_initialized()  # a real run of several processes (torchrun): FSDP over them, for real
    if real_device is not None and gpus != (dist.get_world_size() if launched else 1):
        raise ValueError(f"a real run of {gpus} processes needs a launcher of {gpus} (torchrun)")
    if real_device is None and launched:
        raise RuntimeError("bench-memory runs its own fake process group: run it outside a launcher")
    shape = (dcfg.out_dim, (frames - 1) // 4 + 1, height // 8, width // 8)  # one sample's latent [C, F, h, w]
    shift, steps = student_steps(cfg)
    grid = FlowGrid(shift)
    # two micro-batches show the steady state of any number: the first makes the gradients, the rest add to them
    runs = min(sc.grad_accum, 2)
    draws = [Draws.draw(SampleDraws(cfg.seed), sc, grid, steps, cfg.student.chunk_frames, 0,
                        list(range(m * micro, (m + 1) * micro)), shape) for m in range(runs)]
    t0 = time.perf_counter()
    fake = real_device is None
    if fake:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    try:
        def dit(trained: bool) -> WanDiT:
            if fake:
                m = build_on_meta(lambda: WanDiT(dcfg, attention=attention))
            else:
                torch.manual_seed(cfg.seed)
                m = WanDiT(dcfg, attention=attention)
                m.init_weights()
            m.gradient_checkpointing = sc.checkpointing and trained
            return m.train().requires_grad_(True) if trained else m.eval().requires_grad_(False)

        dev = real_device or "cpu"  # fake: the GPU of rank 0, every tensor of the step lives here
        models = dit(True), dit(True), dit(False), dit(False)  # generator, critic, real score, the generator's EMA
        rank = _Rank(gpus, dev) if fake or launched else None
        fd = FakeDevice(dev) if fake else None
        mode = fd if fake else contextlib.nullcontext()
        with mode, MemoryTracker() as tr:
            gen, critic, real, ema = models
            if fake:  # sharded, then materialised as (fake) shards
                for m in models:
                    rank.shard(m, cfg.parallel)
                    _materialise(m, fd)
            else:
                for m in models:
                    m.to(dev)
                    if launched:
                        rank.shard(m, cfg.parallel)
                tr.track(*models)
            opt_g, opt_c = optimizers(sc, gen, critic)
            # the shards' own bytes: materialising sharded meta weights leaves storages the tracker keeps seeing
            weights = sum(_local_bytes(m.state_dict(keep_vars=True).values()) for m in (gen, critic, real, ema))
            baseline = tr.current_bytes(dev)
            dmd = DMDStep(sc, cfg.student.chunk_frames, steps, grid, gen, critic, real, ema, opt_g, opt_c,
                          compute_dtype(gen, cfg.parallel), sc.real_score == "causal-teacher")
            batches = [MicroBatch(draws=d, cond=torch.zeros(micro, dcfg.text_len, dcfg.text_dim, device=dev),
                                  uncond=torch.zeros(micro, dcfg.text_len, dcfg.text_dim, device=dev),
                                  data=torch.zeros(micro, *shape, device=dev)) for d in draws]
            inputs = tr.current_bytes(dev) - baseline
            tr.reset_peak(dev)
            with autocast(sc.autocast, dev):  # as the stage runs it
                dmd(0, batches[:1])  # step 0 updates the generator and the critic (gen_every divides 0) ...
            after_first = tr.current_bytes(dev)  # ... and makes the optimizers' state
            peak_first = tr.peak_bytes(dev)
            tr.reset_peak(dev)
            with autocast(sc.autocast, dev):
                dmd(sc.gen_every, batches)  # a later generator step: the steady state, with the optimizer state
            # counted above the baseline, on top of the weights
            peak = weights + max(peak_first, tr.peak_bytes(dev)) - baseline
            after_first = weights + after_first - baseline
            optimizer = _local_bytes(t for opt in (opt_g, opt_c) for st in opt.state.values() for t in st.values())
    finally:
        if fake:
            dist.destroy_process_group()
    return {
        "bench": "train-memory", "stage": "dmd", "preset": cfg.name, "dit": cfg.dit.preset, "gpus": gpus,
        "strategy": cfg.parallel.strategy, "param_dtype": cfg.parallel.param_dtype,
        "checkpointing": sc.checkpointing, "generator_input": sc.generator_input, "real_score": sc.real_score,
        "size": f"{width}x{height}", "frames": frames, "latent_frames": shape[1],
        "chunk_frames": cfg.student.chunk_frames,
        "global_batch": sc.batch, "grad_accum": sc.grad_accum, "micro_batch_per_gpu": micro, "micro_batches_run": runs,
        "measured_on": (f"a real run on {real_device}" if real_device else
                        "fake tensors and a fake process group (rank 0), DiT attention as the flash kernel"),
        "peak_bytes": peak, "peak_gib": round(peak / GIB, 2),
        "parts": {
            "model_states_before_step": weights,  # 4 sharded DiTs (generator, EMA, critic, real score)
            "optimizer_states": optimizer,  # AdamW's two moments, sharded like the weights
            # what else stays between steps (FSDP's own buffers: two real gloo processes keep the same, tested)
            "kept_between_steps": after_first - weights - inputs - optimizer,
            "step_peak_over_resident": peak - after_first,
        },
        "not_counted": "CUDA context, NCCL buffers, allocator fragmentation",
        "wall_s": round(time.perf_counter() - t0, 1),
    }
