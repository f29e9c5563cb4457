"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the stages that train a DiT, and the checkpoint format
that lets a sharded run resume with any number of processes.

`parallel.strategy=fsdp` shards every DiT a training stage holds (the trained one, its EMA, DMD's critic and
real score; ODE pairs, which trains nothing, runs a whole teacher in each process) block by block over all processes: each keeps 1/N of the weights, gradients and optimizer state and
gathers one block's weights at a time. Gradients are reduce-scattered as averages, so the global batch's
mean gradient is what every shard steps with, as under DDP. With one process nothing is sharded.

state.pt stays one file of whole tensors, whatever the strategy and process count: every process takes
part in gathering each sharded tensor (one at a time, so only the main process holds the whole state), and
on resume each process cuts its own shard out of the memory-mapped file (reading only its pages). A run
checkpointed by 1, 2 or 8 processes, sharded or not, resumes under any other.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def mesh_for(world: int, device: torch.device):
    """The 1-D device mesh of all `world` processes (FSDP's)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world,))


def shard(model: nn.Module, parallel, world: int, device: torch.device, mesh=None) -> nn.Module:
    """The model sharded over `world` processes when parallel.strategy is fsdp (in place); else unchanged.
    Each of model.blocks is its own unit (one block's full weights are gathered at a time), the rest (patch
    embedding, text and time embeddings, head) the root's. mesh: mesh_for(world, device) (made here if None)."""
    if parallel.strategy != "fsdp" or world == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = mesh if mesh is not None else mesh_for(world, device)
    # weights are gathered in param_dtype for compute; gradients are reduced and kept in float32
    # inputs are not cast: the timesteps and the modulation stay float32 (bf16 would round 998 of the 1000
    # grid timesteps); the model casts its activations to the weights' dtype itself
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[parallel.param_dtype], reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    # no model.to(device) first: fully_shard moves each unit's weights to the mesh's device as it shards them,
    # so a whole model is never on one GPU (a meta-built one is materialised after, with to_empty)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=parallel.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=parallel.reshard_after_forward)
    return model


def is_sharded(obj: Any) -> bool:
    """A module with sharded (DTensor) parameters, or an optimizer over them."""
    if isinstance(obj, nn.Module):
        from torch.distributed.fsdp import FSDPModule

        return isinstance(obj, FSDPModule)  # its parameters may be gathered plain tensors between units
    if isinstance(obj, torch.optim.Optimizer):
        params = [p for g in obj.param_groups for p in g["params"]]
    else:
        return False
    return bool(params) and isinstance(params[0], _dtensor())


def compute_dtype(model: nn.Module, parallel) -> torch.dtype:
    """The dtype a (possibly sharded) DiT computes in: FSDP's param_dtype, else its parameters'."""
    if is_sharded(model):
        return DTYPES[parallel.param_dtype]
    return next(model.parameters()).dtype


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_; the total norm as a 0-dim tensor on the device (no host sync), whole for
    sharded parameters (whose norm is a DTensor over every shard)."""
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    return norm.full_tensor() if isinstance(norm, _dtensor()) else norm


def full_state(obj: Any, keep: bool) -> Optional[dict]:
    """obj.state_dict() with every sharded tensor gathered whole on the CPU. Collective: every process calls
    it; only those with keep=True get the dict (the others drop each gathered tensor at once)."""
    DTensor = _dtensor()

    def gather(v):
        if isinstance(v, DTensor):
            full = v.full_tensor()
            return full.cpu() if keep else None
        if isinstance(v, dict):
            return {k: gather(x) for k, x in v.items()}
        if isinstance(v, list):
            return [gather(x) for x in v]
        return v

    state = gather(obj.state_dict())
    return state if keep else None


def load_full_state(obj: Any, state: dict) -> None:
    """obj.load_state_dict(state) for a state of whole tensors: a sharded module or optimizer takes its own
    shard of each (cut locally: every process read the same file)."""
    if not is_sharded(obj):
        obj.load_state_dict(state)
        return
    if isinstance(obj, nn.Module):
        current = obj.state_dict()
        obj.load_state_dict({k: _like(v, current[k]) for k, v in state.items()})
        return
    params = [p for g in obj.param_groups for p in g["params"]]  # the ids of state_dict()'s "state"
    loaded = {}
    for pid, entry in state["state"].items():
        p = params[int(pid)]
        loaded[pid] = {k: _like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                       for k, v in entry.items()}
    obj.load_state_dict({**state, "state": loaded})


def scatter_full_state(module: nn.Module, state: Optional[dict]) -> None:
    """Fill a sharded module from whole tensors that only the mesh's first process holds (`state`; None on
    the others): tensor by tensor, that process sends each the rows of its shard. Collective."""
    from torch.distributed.tensor import distribute_tensor

    loaded = {}
    for key, template in module.state_dict().items():
        mesh = template.device_mesh
        if state is not None:
            full = state[key].to(device=template.device, dtype=template.dtype)
        else:  # a receive buffer of the whole shape: one tensor at a time
            full = torch.empty(template.shape, dtype=template.dtype, device=template.device)
        loaded[key] = distribute_tensor(full, mesh, template.placements, src_data_rank=0)
    module.load_state_dict(loaded)


def _like(full: torch.Tensor, template) -> torch.Tensor:
    """A whole tensor as `template` holds it: the local shard of a DTensor template, else itself. The shard is
    cut on the host first (torch.chunk, as DTensor's Shard places rows), so only it is read from a memory-
    mapped file and copied to the device."""
    DTensor = _dtensor()
    if not isinstance(template, DTensor):
        return full
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh, placements = template.device_mesh, template.placements
    if len(placements) == 1 and isinstance(placements[0], Shard):
        dim = placements[0].dim
        chunks = torch.chunk(full, mesh.size(), dim=dim)
        rank = mesh.get_local_rank()
        local = chunks[rank] if rank < len(chunks) else full.narrow(dim, 0, 0)
        local = local.to(device=template.device, dtype=template.dtype).contiguous()
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=full.shape, stride=full.stride())
    # src_data_rank=None: every process cuts its own shard from its own copy, no communication
    return distribute_tensor(full.to(device=template.device, dtype=template.dtype), mesh, placements,
                             src_data_rank=None)
