"""Reading, recognising and writing checkpoints: one entry point per model, every layout users hold.

DiT layouts recognised by `load_dit`:
- our own safetensors (config in the metadata, `causvid.*` keys);
- a Wan2.1 folder: config.json + diffusion_pytorch_model.safetensors, or sharded files with
  diffusion_pytorch_model.safetensors.index.json;
- Wan-keyed safetensors, optionally under ComfyUI's `model.diffusion_model.` prefix;
- CausVid / Self-Forcing / LongLive `.pt` dicts ({"generator_ema"} preferred over {"generator"}),
  keys prefixed with `model.` and possibly containing `_fsdp_wrapped_module.`;
- LongLive's PEFT LoRA ({"generator_lora": ...}), merged into a base at its rank and alpha.
Pickles are read only with torch.load(weights_only=True); anything needing code to run is refused.
Models are built on the meta device and loaded with assign=True, so peak memory stays near the
size of the weights.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .config import DiTConfig

FORMAT_TAG = "causvid-stream/1"
META_FORMAT, META_KIND, META_CONFIG = "causvid.format", "causvid.kind", "causvid.config"
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
WAN_HEAD_DIM = 128  # every released Wan DiT; used to infer num_heads from dim
CAUSAL_PT_PREFERENCE = ("generator_ema", "generator", "model", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message that says why and what to do."""


@dataclass
class RawCheckpoint:
    tensors: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    layout: str = "safetensors"  # how the file was read, for messages and `causvid info`
    path: str = ""


# -- low-level readers -------------------------------------------------------------------------

def _read_safetensors(path: Path, dtype: Optional[torch.dtype]) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        out: dict[str, Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for k in f.keys():
                t = f.get_tensor(k)
                out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out, metadata
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc


def _read_pickle(path: Path) -> Any:
    """torch.load with weights_only=True; refuse pickles that would need code to run."""
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (non-zip) files cannot be memory-mapped
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)  # torch's wording varies between versions: find the paragraph that says why
        m = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text, re.S)
        paras = [m.group(1)] if m else [q for q in re.split(r"\n\s*\n", text)
                                         if re.search(r"GLOBAL|[Uu]nsupported|operand|blocked|truncat|EOF", q)]
        reason = " ".join((paras[0] if paras else text.split("\n")[0]).split())[:300]
        if re.search(r"[Uu]nsupported operand|truncat|EOF", reason):  # bytes that are no pickle at all
            raise CheckpointError(f"{path}: not a checkpoint torch.load(weights_only=True) can read: truncated, "
                                  f"corrupt, or not a PyTorch file ({reason})") from exc
        raise CheckpointError(
            f"{path}: refused: this pickle contains Python objects that would run code when loaded "
            f"(torch.load(weights_only=True) rejected it: {reason}). Only plain tensor checkpoints are "
            "accepted; convert the file to safetensors in an environment you trust.") from exc
    except (EOFError, IndexError, struct.error, zipfile.BadZipFile) as exc:  # truncated legacy pickles
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({str(exc) or 'unexpected end of file'}); "
                              "download it again") from exc
    except RuntimeError as exc:
        msg = str(exc)
        if any(pat in msg for pat in ("zip", "central directory", "file_size", "PytorchStreamReader",
                                  "unexpected EOF", "corrupted")):  # the last two: legacy (non-zip) files
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({msg.splitlines()[0]}); "
                                  "download it again") from exc
        raise


def _flatten_tensors(obj: Any, path: Path) -> dict[str, Tensor]:
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:8]}")
    return dict(obj)


def read_checkpoint(path: str | os.PathLike, dtype: Optional[torch.dtype] = None) -> RawCheckpoint:
    """Read any supported file or folder into tensors + metadata, without interpreting the keys."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_dir():
        return _read_folder(p, dtype)
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: the file is empty (an interrupted download?)")
    if p.suffix == ".safetensors":
        tensors, meta = _read_safetensors(p, dtype)
        return RawCheckpoint(tensors, meta, "safetensors", str(p))
    if p.suffix in PICKLE_SUFFIXES:
        obj = _read_pickle(p)
        if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            layout, tensors = "pickle", obj
        elif isinstance(obj, dict):
            layout, tensors = _pick_from_training_dict(obj, p)
        else:
            raise CheckpointError(f"{p}: expected a dict of tensors, found {type(obj).__name__}")
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        return RawCheckpoint(tensors, {}, layout, str(p))
    raise CheckpointError(f"{p}: unknown file type {p.suffix!r}; expected .safetensors, a folder, or "
                          f"one of {', '.join(PICKLE_SUFFIXES)}")


def _pick_from_training_dict(obj: dict, path: Path) -> tuple[str, dict[str, Tensor]]:
    """CausVid / Self-Forcing / LongLive training dicts: take the EMA generator, else the generator."""
    for name in CAUSAL_PT_PREFERENCE:
        if isinstance(obj.get(name), dict):
            return f"pickle[{name}]", _flatten_tensors(obj[name], path)
    if isinstance(obj.get("generator_lora"), dict):
        return "pickle[generator_lora]", _flatten_tensors(obj["generator_lora"], path)
    raise CheckpointError(f"{path}: a training checkpoint without model weights: top-level keys "
                          f"{sorted(obj)[:10]}; expected one of {CAUSAL_PT_PREFERENCE}")


def _read_folder(p: Path, dtype: Optional[torch.dtype]) -> RawCheckpoint:
    """A Wan2.1 / diffusers-style folder: config.json + single or sharded safetensors; a diffusers pipeline
    folder (model_index.json) is read from its transformer/ folder."""
    if (p / "model_index.json").exists() and (p / "transformer").is_dir():
        p = p / "transformer"
    index = sorted(p.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (p / s).exists()]
        if missing:
            raise CheckpointError(f"{p}: shards listed in {index[0].name} are missing: {missing}")
        tensors: dict[str, Tensor] = {}
        meta: dict[str, str] = {}
        for s in shards:
            t, m = _read_safetensors(p / s, dtype)
            tensors.update(t)
            meta.update(m)
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{p}: {len(absent)} tensors of the index are in no shard, e.g. {absent[:5]}")
        layout = "folder-sharded"
    else:
        files = sorted(p.glob("*.safetensors"))
        if (p / "diffusion_pytorch_model.safetensors") in files:  # Wan's name, beside e.g. a VAE or T5 file
            files = [p / "diffusion_pytorch_model.safetensors"]
        if len(files) != 1:
            raise CheckpointError(f"{p}: expected one .safetensors file or a *.safetensors.index.json, "
                                  f"found {[f.name for f in files]}")
        tensors, meta = _read_safetensors(files[0], dtype)
        layout = "folder"
    cfg_file = p / "config.json"
    if cfg_file.exists():
        meta = dict(meta)
        meta["folder.config"] = cfg_file.read_text()
    return RawCheckpoint(tensors, meta, layout, str(p))


# -- key normalisation -------------------------------------------------------------------------

# diffusers' WanTransformer3DModel names -> Wan2.1's (the block's cross-attention norm is diffusers' norm2,
# Wan's norm3; diffusers' norm1 / norm3 carry no weights)
_DIFFUSERS_RENAMES = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("proj_out.", "head.head."),
    (".attn1.to_q.", ".self_attn.q."), (".attn1.to_k.", ".self_attn.k."), (".attn1.to_v.", ".self_attn.v."),
    (".attn1.to_out.0.", ".self_attn.o."), (".attn1.norm_q.", ".self_attn.norm_q."),
    (".attn1.norm_k.", ".self_attn.norm_k."),
    (".attn2.to_q.", ".cross_attn.q."), (".attn2.to_k.", ".cross_attn.k."), (".attn2.to_v.", ".cross_attn.v."),
    (".attn2.to_out.0.", ".cross_attn.o."), (".attn2.norm_q.", ".cross_attn.norm_q."),
    (".attn2.norm_k.", ".cross_attn.norm_k."), (".attn2.add_k_proj.", ".cross_attn.k_img."),
    (".attn2.add_v_proj.", ".cross_attn.v_img."), (".attn2.norm_added_k.", ".cross_attn.norm_k_img."),
    (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."), (".norm2.", ".norm3."),
)


def is_diffusers_dit(tensors: dict[str, Tensor]) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1.to_q." in k for k in tensors)


def from_diffusers_keys(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers WanTransformer3DModel state dict under Wan2.1's key names."""
    out = {}
    for k, v in tensors.items():
        if k == "scale_shift_table":
            k = "head.modulation"
        elif k.endswith(".scale_shift_table"):
            k = k[: -len("scale_shift_table")] + "modulation"
        else:
            for old, new in _DIFFUSERS_RENAMES:
                k = k.replace(old, new) if old.startswith(".") else (new + k[len(old):] if k.startswith(old) else k)
        out[k] = v
    return out


def diffusers_config(d: dict) -> dict:
    """DiTConfig fields from a diffusers WanTransformer3DModel config.json."""
    heads, head_dim = int(d["num_attention_heads"]), int(d["attention_head_dim"])
    out = {"dim": heads * head_dim, "num_heads": heads, "in_dim": d.get("in_channels", 16),
           "out_dim": d.get("out_channels", 16), "model_type": "i2v" if d.get("image_dim") else "t2v",
           "qk_norm": bool(d.get("qk_norm", True))}
    for name in ("ffn_dim", "freq_dim", "text_dim", "num_layers", "eps", "cross_attn_norm", "patch_size"):
        if name in d:
            out[name] = tuple(d[name]) if name == "patch_size" else d[name]
    return out


def normalize_dit_keys(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip ComfyUI / training-wrapper prefixes so keys are Wan's own; drop non-DiT parts of bundles."""
    out = {}
    bundle = any(t.replace("_fsdp_wrapped_module.", "").replace("_orig_mod.", "").startswith(COMFY_PREFIXES)
                 for t in tensors)
    for k, v in tensors.items():
        k = k.replace("_fsdp_wrapped_module.", "").replace("_orig_mod.", "")
        for prefix in COMFY_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        else:
            if bundle:
                continue  # a bundle (VAE/text encoder beside the diffusion model): keep the DiT only
        for prefix in ("module.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def infer_dit_config(sd: dict[str, Tensor], **overrides: Any) -> DiTConfig:
    """A DiTConfig from tensor shapes (ComfyUI's detection): dim from head.modulation, heads = dim/128."""
    required = ("patch_embedding.weight", "head.modulation", "head.head.weight", "time_embedding.0.weight",
                "text_embedding.0.weight", "blocks.0.ffn.0.weight")
    absent = [k for k in required if k not in sd]
    if absent:
        sample = sorted(sd)[:6]
        raise CheckpointError(f"unknown architecture: this is not a Wan2.1 DiT (missing {absent[:3]}; "
                              f"its keys look like {sample})")
    dim = sd["head.modulation"].shape[-1]
    patch = tuple(sd["patch_embedding.weight"].shape[2:])
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    fields: dict[str, Any] = dict(
        model_type="i2v" if "img_emb.proj.0.weight" in sd else "t2v",
        patch_size=patch,
        in_dim=sd["patch_embedding.weight"].shape[1],
        dim=dim,
        ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
        freq_dim=sd["time_embedding.0.weight"].shape[1],
        text_dim=sd["text_embedding.0.weight"].shape[1],
        out_dim=sd["head.head.weight"].shape[0] // (patch[0] * patch[1] * patch[2]),
        num_layers=layers,
        qk_norm="blocks.0.self_attn.norm_q.weight" in sd,
        cross_attn_norm="blocks.0.norm3.weight" in sd,
    )
    if "img_emb.proj.0.weight" in sd:
        fields["clip_dim"] = sd["img_emb.proj.0.weight"].shape[0]
    if "num_heads" not in overrides:
        if dim % WAN_HEAD_DIM:
            raise CheckpointError(f"cannot infer num_heads for dim {dim} (not a multiple of Wan's head dim "
                                  f"{WAN_HEAD_DIM}); give num_heads, or use a file that carries its config")
        fields["num_heads"] = dim // WAN_HEAD_DIM
    fields.update(overrides)
    try:
        return DiTConfig.from_dict(fields)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"the weights give an impossible config: {exc}") from exc


def config_from_metadata(meta: dict[str, str], sd: Optional[dict[str, Tensor]] = None,
                         **overrides: Any) -> Optional[DiTConfig]:
    """The config a file carries: ours (complete), or a Wan folder's config.json.

    Wan's config.json lacks text_dim, patch_size, qk_norm, cross_attn_norm, ...: given the state dict `sd`,
    those are taken from the tensor shapes, config.json's fields win over them and `overrides` over both;
    without `sd`, defaults fill them.
    """
    try:
        if META_CONFIG in meta:
            return DiTConfig.from_dict(json.loads(meta[META_CONFIG]))
        if "folder.config" in meta:
            d = json.loads(meta["folder.config"])
            if not isinstance(d, dict):
                raise CheckpointError(f"config.json holds a {type(d).__name__}, not an object")
            if d.get("_class_name") == "WanTransformer3DModel":
                d = diffusers_config(d)
            if sd is not None:
                names = {f.name for f in dataclasses.fields(DiTConfig)}
                return infer_dit_config(sd, **{**{k: v for k, v in d.items() if k in names}, **overrides})
            if "dim" in d and "num_heads" in d:
                return DiTConfig.from_dict(d)
    except CheckpointError:
        raise
    except (ValueError, TypeError) as exc:  # bad JSON, or fields DiTConfig rejects (e.g. model_type "flf2v")
        raise CheckpointError(f"unusable model config in the checkpoint: {exc}") from exc
    return None


# -- LoRA --------------------------------------------------------------------------------------

_LORA_KEY = re.compile(r"(.+)\.(lora_A|lora_B|lora_down|lora_up)(?:\.[A-Za-z0-9_]+)?\.weight$")
_LORA_PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.", "model.")


def is_lora(tensors: dict[str, Tensor]) -> bool:
    return any(_LORA_KEY.match(k) for k in tensors)


def merge_lora(sd: dict[str, Tensor], lora: dict[str, Tensor], alpha: Optional[float] = None,
               strength: float = 1.0) -> int:
    """W += strength * (alpha / rank) * B @ A for every LoRA pair (LongLive: rank 256, alpha 256); returns the count.

    Layouts: PEFT (`base_model.model.blocks.0.self_attn.q.lora_A.weight`, optionally with an adapter name,
    `lora_A.default.weight`) and ComfyUI's (`diffusion_model.blocks.0.self_attn.q.lora_down.weight` / `lora_up`,
    or kohya's `lora_unet_blocks_0_self_attn_q.lora_down.weight`, with `.alpha`). alpha defaults to the rank
    (scale 1) unless the file has `.alpha`.
    """
    underscored = {name[: -len(".weight")].replace(".", "_"): name[: -len(".weight")]
                   for name in sd if name.endswith(".weight")}
    pairs: dict[str, dict[str, Tensor]] = {}
    unused: list[str] = []
    for k, v in lora.items():
        k = k.replace("_fsdp_wrapped_module.", "")
        for prefix in _LORA_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        if k.startswith("lora_unet_"):  # kohya: the module path with underscores
            head, _, tail = k[len("lora_unet_"):].partition(".")
            k = f"{underscored.get(head, head)}.{tail}"
        m = _LORA_KEY.match(k)
        if m:
            part = {"lora_down": "lora_A", "lora_up": "lora_B"}.get(m.group(2), m.group(2))
            pairs.setdefault(m.group(1), {})[part] = v
        elif k.endswith(".alpha"):
            pairs.setdefault(k[: -len(".alpha")], {})["alpha"] = v
        else:
            unused.append(k)
    if unused:  # e.g. ComfyUI's .diff / .diff_b full-tensor patches: not applied here, and said so
        import sys
        print(f"LoRA: {len(unused)} keys are not LoRA pairs and are not applied (e.g. {unused[0]})", file=sys.stderr)
    for module, p in pairs.items():
        if "lora_A" not in p or "lora_B" not in p:
            raise CheckpointError(f"LoRA for {module} is missing lora_A or lora_B")
        target = module + ".weight"
        if target not in sd:  # a diffusers-named LoRA (attn1.to_q, ffn.net.0.proj, ...)
            target = next(iter(from_diffusers_keys({target: None})))
        if target not in sd:
            raise CheckpointError(f"LoRA targets {module}, which the base model does not have")
        A, B = p["lora_A"].float(), p["lora_B"].float()  # [r, in], [out, r]
        rank = A.shape[0]
        a = float(p["alpha"]) if "alpha" in p else (alpha if alpha is not None else rank)
        W = sd[target]
        if (B.shape[0], A.shape[1]) != tuple(W.shape):
            raise CheckpointError(f"LoRA for {module} has shape {B.shape[0]}x{A.shape[1]}, "
                                  f"the weight is {tuple(W.shape)}")
        sd[target] = (W.float() + strength * (a / rank) * (B @ A)).to(W.dtype)
    if not pairs:
        raise CheckpointError("no LoRA weights (lora_A / lora_B) found in the LoRA file")
    return len(pairs)


def _lora_alpha_from_folder(path: Path) -> Optional[float]:
    cfg = path.parent / "adapter_config.json" if path.is_file() else path / "adapter_config.json"
    if cfg.exists():
        d = json.loads(cfg.read_text())
        return float(d["lora_alpha"]) if "lora_alpha" in d else None
    return None


# -- the DiT entry point -------------------------------------------------------------------------

def check_keys(model: torch.nn.Module, sd: dict[str, Tensor], where: str) -> None:
    """Strict loading with a readable message: missing, unexpected and mis-shaped keys, listed."""
    check_key_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, sd, where)


def check_key_shapes(expected: dict[str, tuple], sd: dict[str, Tensor], where: str) -> None:
    """check_keys against {name: shape} (a model's keys under another layout's names)."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {expected[k]}" for k in sorted(set(sd) & set(expected))
              if tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {missing[:10]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {unexpected[:10]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {shapes[:5]}")
        raise CheckpointError(f"{where}: the weights do not match the model config: " + "; ".join(parts))


def load_dit(path: str | os.PathLike, *, lora: str | os.PathLike | None = None,
             lora_alpha: Optional[float] = None, config: Optional[DiTConfig] = None,
             dtype: Optional[torch.dtype] = None, device: torch.device | str = "cpu",
             attention: str | Callable = "sdpa", keep_fp8: Optional[bool] = None, lora_strength: float = 1.0,
             **config_overrides: Any):
    """Load a Wan DiT from any supported layout. Returns a WanDiT in eval mode.

    fp8 files (fp8 and ComfyUI's fp8_scaled): keep_fp8 True keeps the linear layers' weights in fp8 and casts
    them to the compute dtype (`dtype`, default bfloat16) as each layer runs; False dequantises everything to
    `dtype` (default float32). None: keep them on a GPU, dequantise on the CPU."""
    from . import fp8 as fp8_mod
    from .model import WanDiT

    fp8_file = fp8_mod.file_has_fp8(path)
    raw = read_checkpoint(path, dtype=None if fp8_file else dtype)
    if raw.metadata.get(META_KIND) not in (None, "dit"):
        raise CheckpointError(f"{path}: this file holds a {raw.metadata[META_KIND]!r}, not a DiT")
    sd = normalize_dit_keys(raw.tensors)
    if is_diffusers_dit(sd):
        sd = from_diffusers_keys(sd)
    if is_lora(sd):
        raise CheckpointError(f"{path}: this is a LoRA adapter, not a full model; load the base model "
                              "and pass this file as the LoRA")
    if lora is not None and fp8_mod.has_fp8(sd):  # a LoRA is merged into full-precision weights
        fp8_mod.dequantize(sd, dtype if dtype is not None else torch.float32, str(path))
    if lora is not None:
        lora_raw = read_checkpoint(lora)
        if not is_lora(lora_raw.tensors):
            raise CheckpointError(f"{lora}: not a LoRA file (no lora_A / lora_B or lora_down / lora_up weights)")
        alpha = lora_alpha if lora_alpha is not None else _lora_alpha_from_folder(Path(lora))
        merge_lora(sd, lora_raw.tensors, alpha, strength=lora_strength)
    known = config if config is not None else config_from_metadata(raw.metadata, sd, **config_overrides)
    if known is None:
        cfg = infer_dit_config(sd, **config_overrides)
    elif config_overrides:
        try:
            cfg = known.replace(**config_overrides)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: bad config override {config_overrides}: {exc}") from exc
    else:
        cfg = known
    with torch.device("meta"):
        model = WanDiT(cfg, attention=attention)
    if fp8_mod.has_fp8(sd):
        if keep_fp8 is None:
            keep_fp8 = torch.device(device).type != "cpu"
        if keep_fp8:
            compute = dtype if dtype is not None and dtype not in fp8_mod.FP8_DTYPES else torch.bfloat16
            fp8_mod.keep_fp8(model, sd, compute, str(path))
            model.compute_dtype_override = compute
        else:
            fp8_mod.dequantize(sd, dtype if dtype is not None else torch.float32, str(path))
    check_keys(model, sd, str(path))
    model.load_state_dict(sd, strict=True, assign=True)
    model.checkpoint_layout = raw.layout
    return model.to(device).eval()


# -- writing -----------------------------------------------------------------------------------

def default_permissions(path: str | os.PathLike) -> None:
    """mkstemp makes owner-only files; give a written checkpoint the permissions a plain open() would
    (0666 less the umask), so a shared models folder stays readable."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header in place with its metadata keys sorted: the writer emits them in hash order,
    which changes from process to process, so the same weights would give other bytes (and a new blob in git)
    each time they are saved. Same length, same data offsets; left alone if the re-encoded header differs in
    length (an encoding the writer spelt otherwise)."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (n - len(text))
        if len(text) == n:
            f.seek(8)
            f.write(text)


def atomic_save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike,
                            metadata: Optional[dict[str, str]] = None) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written checkpoint."""
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        _sort_metadata(Path(tmp))
        default_permissions(tmp)  # after writing: the writer may recreate the file
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_dit(model, path: str | os.PathLike, extra_metadata: Optional[dict[str, str]] = None,
             state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Our own format: Wan keys + the config in the metadata, so loading needs no guessing. state_dict: the
    weights when the model's own are not whole tensors (a sharded model's, gathered)."""
    meta = {META_FORMAT: FORMAT_TAG, META_KIND: "dit", META_CONFIG: model.config.to_json()}
    meta.update(extra_metadata or {})
    atomic_save_safetensors(model.state_dict() if state_dict is None else state_dict, path, meta)
