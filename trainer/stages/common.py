"""Paths and model builders the stages share."""
from __future__ import annotations

from pathlib import Path

import torch

from causvid_core.checkpoints import load_dit
from causvid_core.config import DiTConfig, dit_preset
from causvid_core.flow import FlowGrid, step_preset
from causvid_core.model import WanDiT

from ..config import TrainConfig
from ..losses import contrast_prompts

STAGE_OUTPUTS = {
    "vae": ("vae", "vae.safetensors"),
    "vae-decoder": ("vae-decoder", "vae.safetensors"),
    "text": ("text", "text.safetensors"),
    "teacher": ("teacher", "teacher.safetensors"),
    "teacher-refine": ("teacher-refine", "teacher.safetensors"),
    "causal-teacher": ("causal-teacher", "causal_teacher.safetensors"),
    "ode-init": ("ode-init", "student.safetensors"),
    "dmd": ("dmd", "student.safetensors"),
}


def output(root: str | Path, stage: str) -> Path:
    folder, name = STAGE_OUTPUTS[stage]
    return Path(root) / folder / name


def require(root: str | Path, stage: str) -> Path:
    """An earlier stage's output, checked against what that stage finished with (DONE.json's size and hash)."""
    import json

    from ..run import StageStateError, file_matches

    p = output(root, stage)
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: run the {stage!r} stage first (causvid-train {stage} ...)")
    done = p.parent / "DONE.json"
    try:
        want = json.loads(done.read_text()).get("files", {}).get(p.name) if done.exists() else None
    except (OSError, ValueError):
        want = None  # the producing stage's own check names a damaged DONE.json
    if want is not None and not file_matches(p, want):
        raise StageStateError(f"{p} is not the file the {stage!r} stage finished with (truncated or changed): "
                              f"delete {p.parent} to run that stage again")
    return p


def vae_stage(cfg: TrainConfig) -> str:
    """The stage whose VAE is the run's final one: vae-decoder (the fine-tuned decoder) when it is configured."""
    return "vae-decoder" if cfg.vae_decoder.steps > 0 else "vae"


def teacher_stage(cfg: TrainConfig) -> str:
    """The stage whose weights are the run's final teacher: teacher-refine when it is configured."""
    return "teacher-refine" if cfg.teacher_refine.steps > 0 else "teacher"


def dit_config(cfg: TrainConfig) -> DiTConfig:
    return dit_preset(cfg.dit.preset).replace(**cfg.dit.overrides)


def new_dit(cfg: TrainConfig, attention: str = "sdpa") -> WanDiT:
    torch.manual_seed(cfg.seed)  # every process builds the same initial weights
    model = WanDiT(dit_config(cfg), attention=attention)
    model.init_weights()
    return model


def stage_dits(r, parallel, path: Path, attention: str = "sdpa", frozen: tuple[bool, ...] = (False,),
               checkpointing: bool = False) -> list[WanDiT]:
    """DiTs of the file in `path` on the stage's device, one per entry of `frozen` (a trained one and its EMA,
    say), sharded under parallel.strategy=fsdp: then each is built on the meta device and sharded first, and
    all are filled from the main process's one load of the file, tensor by tensor, each process receiving
    its shards. No other process reads the file, and none holds a whole copy on its GPU (for 14B: 57 GB on one
    host, not on every process's and once per copy)."""
    import torch.distributed as dist

    from ..sharding import scatter_full_state

    if not r.shards(parallel):
        first = stage_dit(path, attention, frozen[0], checkpointing).to(r.device)
        return [first] + [_copy_dit(first, f, checkpointing) for f in frozen[1:]]
    # the main process's host copy in the file's dtype, dropped once every shard is sent
    whole = load_dit(path, attention=attention) if r.is_main else None
    info = [(whole.config, next(whole.parameters()).dtype) if whole is not None else None]
    dist.broadcast_object_list(info, src=0)
    config, file_dtype = info[0]
    state = whole.state_dict() if whole is not None else None
    models = []
    for f in frozen:
        with torch.device("meta"):
            m = WanDiT(config, attention=attention)
        if f:  # frozen: the file's dtype, as unsharded; trained: float32 (stage_dit says why)
            m.to(file_dtype)
        m = _frozen_or_trained(m, f, checkpointing)
        r.shard(m, parallel)
        m.to_empty(device=r.device)
        scatter_full_state(m, state)
        models.append(m)
    return models


def _copy_dit(model: WanDiT, frozen: bool, checkpointing: bool) -> WanDiT:
    import copy

    return _frozen_or_trained(copy.deepcopy(model), frozen, checkpointing)


def _frozen_or_trained(model: WanDiT, frozen: bool, checkpointing: bool) -> WanDiT:
    if frozen:
        return model.requires_grad_(False).eval()
    model.gradient_checkpointing = checkpointing
    return model.train().requires_grad_(True)


def stage_dit(path: Path, attention: str = "sdpa", frozen: bool = False, checkpointing: bool = False) -> WanDiT:
    """A DiT of an earlier stage running the given attention kernel (a stage's `attention`): in train mode
    with gradients (and activation checkpointing if asked), or frozen (eval mode, no gradients)."""
    # trained: float32 whatever the file holds (a bf16 ComfyUI repack, say), as AdamW's small steps on bf16
    # weights round away; frozen: the file's dtype
    return _frozen_or_trained(load_dit(path, attention=attention, dtype=None if frozen else torch.float32), frozen,
                              checkpointing)


def save_stage_dit(run, model: torch.nn.Module, path: Path) -> None:
    """save_dit of a stage's DiT, sharded or not. Collective under FSDP: every process calls it."""
    from causvid_core.checkpoints import save_dit

    from ..sharding import full_state

    state = full_state(model, keep=run.is_main)
    if run.is_main:
        save_dit(model, path, state_dict=state)


def load_frozen(path: Path, loader) -> torch.nn.Module:
    model = loader(path)
    model.requires_grad_(False)
    return model.eval()


def student_steps(cfg: TrainConfig) -> tuple[float, list[float]]:
    return step_preset(cfg.student.steps_preset)


def grid_index(grid: FlowGrid, u: torch.Tensor, lo: float = 0.0, hi: float = 1000.0) -> torch.Tensor:
    """Grid timesteps for uniforms u in [0, 1), restricted to raw t in [lo, hi] (DMD clamps to [20, 980])."""
    ts = grid.timesteps
    allowed = torch.nonzero((ts >= lo) & (ts <= hi)).flatten()
    return ts[allowed[(u * len(allowed)).long().clamp(max=len(allowed) - 1)]]


def encode(text_encoder, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder.encode(prompts)


def contrast_negatives(text_encoder, prompts: list[str], weight: float, words) -> list[torch.Tensor]:
    """The encoded rivals of attribute-contrastive guidance ([] when it is off: no weight, or no word groups,
    see ContrastGuidance.active_contrast): K x [B, L, D]."""
    if not weight:
        return []
    return [encode(text_encoder, rivals) for rivals in contrast_prompts(prompts, words)]


# -- a user's own teacher, text encoder and prompts (cfg.inputs) ------------------------------------------------

def teacher_path(cfg: TrainConfig, root: str | Path) -> Path:
    """The run's teacher: the user's file (--teacher), or the teacher stage's output (in a user run: when the
    teacher stage fine-tuned the user's teacher on their clips)."""
    if cfg.inputs.active and cfg.teacher.steps <= 0:
        return Path(cfg.inputs.teacher)
    return require(root, teacher_stage(cfg))


def text_source(cfg: TrainConfig, root: str | Path):
    """What encodes prompts for a stage: the text-embeds stage's stored embeddings (a user run: the text encoder
    is not loaded again), or the text stage's word encoder."""
    if cfg.inputs.active:
        from ..userdata import EmbeddingBank

        folder = Path(root) / "text-embeds"
        if not (folder / "DONE.json").exists():
            raise FileNotFoundError(f"{folder} is not finished: run the text-embeds stage first")
        return EmbeddingBank(folder)
    from causvid_core.text import load_text_encoder

    return load_frozen(require(root, "text"), load_text_encoder)


def run_prompts(cfg: TrainConfig) -> list[str]:
    from ..userdata import read_prompts

    return read_prompts(cfg.inputs.prompts)[0]


def latent_shape(cfg: TrainConfig, dcfg: DiTConfig) -> tuple[int, int, int, int]:
    """[C, F, h, w] of a user run's clips: the Wan VAE's x4 time / x8 space."""
    return dcfg.out_dim, (cfg.data.clip_frames - 1) // 4 + 1, cfg.data.height // 8, cfg.data.width // 8


def require_stage(root: str | Path, stage: str) -> Path:
    """A finished stage's folder (for stages whose outputs are shards)."""
    folder = Path(root) / stage
    if not (folder / "DONE.json").exists():
        raise FileNotFoundError(f"{folder} is not finished: run the {stage} stage first")
    return folder
