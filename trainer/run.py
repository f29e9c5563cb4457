"""What every training stage shares: its folder, resumable atomic checkpoints, JSONL metrics, the
accelerate set-up, per-sample deterministic randomness, and the data split across processes.

Determinism is by construction, not by saved iterator state: the samples of step s are the global
indices [s * batch, (s + 1) * batch), and every random draw of sample i at step s comes from a
generator seeded by (seed, s, i, purpose). So a resumed run redraws exactly what an uninterrupted one
would have, and N processes each taking a slice of a step's indices compute the same global batch
as one process taking all of them.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from causvid_core.checkpoints import default_permissions
from causvid_core.sampler import noise_seed

from . import sharding
from .schedules import set_lr


# how long a collective may wait: the main process gathering and writing a checkpoint of a large run (1.3B DMD:
# ~40 GB) keeps the others at a barrier longer than torch's default 10 minutes
COLLECTIVE_TIMEOUT_MIN = 60


def make_accelerator():
    """accelerate's Accelerator (CPU unless CUDA is there); DDP under `accelerate launch` / torchrun."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    return Accelerator(cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=COLLECTIVE_TIMEOUT_MIN))])


class SampleDraws:
    """Per-sample random draws on the host: sample i at step s for a purpose always gets the same numbers."""

    def __init__(self, seed: int):
        self.seed = seed

    def generator(self, step: int, index: int, purpose: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(noise_seed(self.seed, step, index, purpose))

    def randn(self, step: int, indices: list[int], shape: tuple[int, ...], purpose: int = 0) -> Tensor:
        """[len(indices), *shape] Gaussian noise, each sample's own draw."""
        return torch.stack([torch.randn(shape, generator=self.generator(step, i, purpose)) for i in indices])

    def rand(self, step: int, indices: list[int], shape: tuple[int, ...] = (), purpose: int = 1) -> Tensor:
        return torch.stack([torch.rand(shape, generator=self.generator(step, i, purpose)) for i in indices])


class StageRun:
    """One stage's run in `root/<name>/`: state.pt (resume), metrics.jsonl, DONE.json when finished, and
    seconds.json: the wall-clock seconds spent on the stage so far, over every process that ran it (counted
    at each checkpoint, so work an interruption loses after the last one is not), which DONE.json keeps
    as `seconds`."""

    def __init__(self, root: str | os.PathLike, name: str, seed: int, accelerator=None):
        self.dir = Path(root) / name
        self.name, self.seed = name, seed
        self.draws = SampleDraws(seed)
        self._mesh = None  # FSDP's device mesh, made at the first shard()
        self.sharded = False  # whether shard() sharded a model (DONE.json says so)
        self.acc = accelerator if accelerator is not None else make_accelerator()
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.missing: set[str] = set()  # optional state keys the resumed state.pt did not have
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        self.state_path = self.dir / "state.pt"
        self.metrics_path = self.dir / "metrics.jsonl"
        self.done_path = self.dir / "DONE.json"
        self.seconds_path = self.dir / "seconds.json"
        self._t0 = time.perf_counter()
        self._before = _read_json(self.seconds_path).get("seconds", 0.0) if self.seconds_path.exists() else 0.0

    @property
    def device(self) -> torch.device:
        """Where the stage's models and tensors go (the accelerator's: CUDA when there is one). Noise is drawn on
        the CPU from (seed, step, sample), the same on every device, and moved."""
        return self.acc.device

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def shards(self, parallel) -> bool:
        """Whether shard() shards: FSDP asked for, and more than one process."""
        return parallel.strategy == "fsdp" and self.world > 1

    def shard(self, model: torch.nn.Module, parallel) -> torch.nn.Module:
        """A DiT sharded over the processes under parallel.strategy=fsdp (trainer/sharding.py), else moved whole
        to the device."""
        if not self.shards(parallel):
            return model.to(self.device)  # a whole copy on this process's device (an EMA too)
        if self._mesh is None:
            self._mesh = sharding.mesh_for(self.world, self.device)
        self.sharded = True
        return sharding.shard(model, parallel, self.world, self.device, self._mesh)

    def mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics averaged over the processes (each saw its slice of the batch): what one process would log.
        Collective: every process calls it at the same steps."""
        if self.world == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(values)
        return {k: v / self.world for k, v in zip(keys, values.tolist())}

    @property
    def done(self) -> bool:
        """Finished, and its outputs are what it wrote (DONE.json's sizes and hashes): a stage whose output was
        truncated or edited since is an error, never silently skipped."""
        if not self.done_path.exists():
            return False
        files = _read_json(self.done_path).get("files", {})  # runs finished before files were recorded: none
        for name, want in files.items():
            path = self.dir / name
            if not path.exists() or not file_matches(path, want):
                raise StageStateError(f"{path} is not the file the {self.name!r} stage finished with (missing, "
                                      f"truncated or changed): delete {self.dir} to run the stage again")
        return True

    # -- randomness and data -------------------------------------------------------------------------
    def generator(self, step: int, index: int, purpose: int = 0) -> torch.Generator:
        return self.draws.generator(step, index, purpose)

    def randn(self, step: int, indices: list[int], shape: tuple[int, ...], purpose: int = 0) -> Tensor:
        return self.draws.randn(step, indices, shape, purpose)

    def rand(self, step: int, indices: list[int], shape: tuple[int, ...] = (), purpose: int = 1) -> Tensor:
        return self.draws.rand(step, indices, shape, purpose)

    def local_indices(self, step: int, batch: int, grad_accum: int = 1) -> list[list[int]]:
        """This process's sample indices of a step, split into grad_accum micro-batches."""
        if batch % (self.world * grad_accum):
            raise ValueError(f"batch {batch} must be divisible by processes x grad_accum = {self.world} x {grad_accum}")
        per_rank = batch // self.world
        first = step * batch + self.rank * per_rank
        micro = per_rank // grad_accum
        return [list(range(first + m * micro, first + (m + 1) * micro)) for m in range(grad_accum)]

    # -- time ---------------------------------------------------------------------------------------
    @property
    def seconds(self) -> float:
        """Wall-clock seconds spent on this stage: earlier processes' (seconds.json) plus this one's."""
        return self._before + time.perf_counter() - self._t0

    def save_seconds(self) -> None:
        """Record the time spent so far (called at every checkpoint, or after each unit of resumable work)."""
        if self.is_main:
            atomic_write_text(self.seconds_path, json.dumps({"seconds": round(self.seconds, 1)}))

    # -- checkpoints ----------------------------------------------------------------------------------
    def resume(self, objects: dict[str, Any], optional: tuple[str, ...] = ()) -> int:
        """Load state.pt into the objects (anything with load_state_dict); return the step to start at.
        Keys in `optional` may be missing from an older state (e.g. an EMA added to a running stage):
        those objects keep their current value."""
        if not self.state_path.exists():
            self._truncate_metrics(0)
            return 0
        try:  # memory-mapped: a sharded process reads only its own shard's pages
            state = torch.load(self.state_path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # a truncated or corrupt checkpoint (torch raises several kinds)
            raise StageStateError(f"{self.state_path} is unreadable ({type(exc).__name__}): delete it to start the "
                                  f"{self.name!r} stage again from its first step (no earlier checkpoint is kept)"
                                  ) from None
        self.missing = {k for k in objects if k not in state and k in optional}
        for key, obj in objects.items():
            if key not in self.missing:
                sharding.load_full_state(obj, state[key])
        torch.set_rng_state(state["rng"])
        step = int(state["step"])
        self._truncate_metrics(step)
        return step

    def checkpoint(self, step: int, objects: dict[str, Any]) -> None:
        """Atomically write every object's state and the step to resume at."""
        self.acc.wait_for_everyone()
        # every process gathers the sharded tensors with the others; the main one keeps and writes them
        state = {k: sharding.full_state(_unwrap(self.acc, v), keep=self.is_main) for k, v in objects.items()}
        if self.is_main:
            state.update(step=step, rng=torch.get_rng_state())
            atomic_torch_save(state, self.state_path)
            self.save_seconds()
        self.acc.wait_for_everyone()

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines logged after the checkpoint we resume from (they will be logged again)."""
        if not self.is_main or not self.metrics_path.exists():
            return
        keep = [l for l in self.metrics_path.read_text().splitlines() if l and json.loads(l)["step"] < step]
        atomic_write_text(self.metrics_path, "".join(l + "\n" for l in keep))

    # -- metrics --------------------------------------------------------------------------------------
    def log(self, step: int, **metrics: float) -> None:
        if not self.is_main:
            return
        row = {"step": step, "time": round(self.seconds, 3), **metrics}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(l) for l in self.metrics_path.read_text().splitlines() if l]

    def finish(self, **outputs: Any) -> None:
        if self.is_main:
            self.save_seconds()
            skip = {self.done_path.name, self.seconds_path.name, self.metrics_path.name, self.state_path.name}
            files = {p.name: file_record(p) for p in sorted(self.dir.iterdir())
                     if p.is_file() and p.name not in skip and not p.name.endswith(".part")}
            done = {"stage": self.name, **outputs, "seconds": round(self.seconds, 1), "processes": self.world,
                    "sharded": self.sharded, "files": files}
            atomic_write_text(self.done_path, json.dumps(done, indent=2))
        self.acc.wait_for_everyone()


class StageStateError(RuntimeError):
    """A run folder's state (checkpoint, DONE.json, outputs) is damaged; the message says what to delete."""


def file_record(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_hash(path)}


def file_matches(path: Path, want: dict) -> bool:
    """The file is the one recorded: its size, then (only when its modification time moved) its hash. A large
    checkpoint is hashed once, not at every check."""
    st = path.stat()
    if st.st_size != want["size"]:
        return False
    return st.st_mtime_ns == want.get("mtime_ns") or file_hash(path) == want["sha256"]


def file_hash(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StageStateError(f"{path} is unreadable ({type(exc).__name__}: truncated?): delete it (and, for "
                              f"DONE.json, the stage's folder) to run the stage again") from None
    if not isinstance(data, dict):
        raise StageStateError(f"{path} does not hold a JSON object: delete it to run the stage again")
    return data


def _unwrap(acc, obj):
    return acc.unwrap_model(obj) if isinstance(obj, torch.nn.Module) else obj


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    default_permissions(tmp)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def autocast(enabled: bool, device: torch.device | str = "cpu"):
    """bfloat16 autocast (LoopConfig.autocast) on the device's type; a no-op context when not enabled."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def train_steps(run: StageRun, cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                loss_fn, extra_state: Optional[dict[str, Any]] = None, progress: bool = True,
                after_step=None, lr_fn=None, optional_state: tuple[str, ...] = (),
                compilable: bool = True, before_step=None) -> torch.nn.Module:
    """The shared loop: resume, for each step: micro-batches (no DDP sync until the last), clip, step,
    log, checkpoint; finally a last checkpoint. loss_fn(step, indices) -> (loss, metrics dict), run under
    bfloat16 autocast when cfg.autocast; lr_fn(step) -> the learning rate of that step (None: the optimizer's
    own, constant); before_step(step) runs first in every step. compilable: whether loss_fn goes through the
    model's forward, which cfg.compile compiles (the VAE stages call encode / decode)."""
    from tqdm import tqdm

    acc = run.acc
    sharded = sharding.is_sharded(model)  # FSDP reduces its own gradients: accelerate's DDP wrapper stays out
    if not sharded:
        model, optimizer = acc.prepare(model, optimizer)
    if cfg.compile:
        if not compilable:
            raise ValueError(f"{run.name.replace('-', '_')}.compile: this stage's loss calls no forward() that "
                             "nn.Module.compile reaches (it encodes and decodes); leave compile off")
        model.compile()  # in place: the state dict (checkpoints, EMA, the saved model) keeps its keys
    objects = {"model": model, "optimizer": optimizer, **(extra_state or {})}
    start = run.resume({k: _unwrap(acc, v) for k, v in objects.items()}, optional=optional_state)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=run.name,
               disable=not (progress and run.is_main), dynamic_ncols=True)
    for step in bar:
        if before_step is not None:
            before_step(step)
        if lr_fn is not None:
            set_lr(optimizer, lr_fn(step))
        micro_batches = run.local_indices(step, cfg.batch, cfg.grad_accum)
        sums: dict[str, float] = {}
        for m, indices in enumerate(micro_batches):
            last = m == len(micro_batches) - 1
            # FSDP reduce-scatters every micro-batch's gradients: skipping that would keep whole unsharded
            # gradients on each GPU between micro-batches (56 GB of float32 for 14B)
            sync = contextlib.nullcontext() if last or sharded else acc.no_sync(model)
            with sync:
                with autocast(cfg.autocast, acc.device):
                    loss, metrics = loss_fn(step, indices, model)
                if sharded:
                    (loss / len(micro_batches)).backward()
                else:
                    acc.backward(loss / len(micro_batches))
            for k, v in {"loss": loss.detach(), **metrics}.items():  # tensors: read on the host when logged
                sums[k] = sums.get(k, 0.0) + v / len(micro_batches)
        if cfg.grad_clip:
            sums["grad_norm"] = (sharding.clip_grad_norm(model.parameters(), cfg.grad_clip) if sharded else
                                 acc.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(step)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            sums = run.mean({k: float(v) for k, v in sums.items()})
            run.log(step, **{k: round(v, 9) for k, v in sums.items()})  # finer than 1e-6 curves
            bar.set_postfix(loss=f"{sums['loss']:.4f}")
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            run.checkpoint(step + 1, objects)
    run.checkpoint(cfg.steps, objects)
    return _unwrap(acc, model)
