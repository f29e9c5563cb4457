"""umT5-XXL text encoder for real Wan2.1 models: every key layout, the tokenizer, and the encoder, which is
transformers' `UMT5EncoderModel` (what Wan's `T5Encoder`, wan/modules/t5.py, computes; T5 v1.1's shared position
bias as `T5EncoderModel`). Wan's `models_t5_umt5-xxl-enc-bf16.pth`, transformers folders, diffusers'
`text_encoder/` and ComfyUI's `umt5_xxl_fp16.safetensors` / scaled-fp8 file load by renaming their keys; scaled
fp8 is dequantised (fp8.py).

`T5TextEncoder.encode(prompts) -> [B, text_len, dim]` keeps the contract of text.py: rows past
each prompt's length (its tokens + EOS) are zero. Unlike the built-in word encoder, an empty prompt
is not all zeros: it is one EOS token, exactly as in Wan.

Shapes: B batch, L tokens, D model dim, H heads, Dh head dim, A = H * Dh (dim_attn), F ffn dim.
"""
from __future__ import annotations

import dataclasses
import html
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .checkpoints import CheckpointError, check_key_shapes, read_checkpoint
from .fp8 import FP8_DTYPES, dequantize

__all__ = ["UMT5Config", "UMT5_PRESETS", "UMT5Encoder", "T5TextEncoder", "UMT5Tokenizer",
           "to_wan_keys", "to_encoder_keys", "infer_umt5_config", "load_umt5",
           "load_tokenizer", "load_umt5_text_encoder", "clean_prompt", "MISSING_FILES_HELP"]

WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"  # in every Wan2.1 model folder
WAN_TOKENIZER_SUBDIR = ("google", "umt5-xxl")  # the tokenizer folder beside it
MISSING_FILES_HELP = (
    "download models_t5_umt5-xxl-enc-bf16.pth (from any Wan2.1 repo, e.g. Wan-AI/Wan2.1-T2V-1.3B) "
    "or umt5_xxl_fp16.safetensors (Comfy-Org/Wan_2.1_ComfyUI_repackaged, into ComfyUI/models/text_encoders), "
    "and the google/umt5-xxl tokenizer folder (tokenizer.json or spiece.model; Wan2.1 repos ship it as "
    "google/umt5-xxl/)")
# Bundles and converters that put the transformers-layout keys under a prefix (stripped when every key has it).
KEY_PREFIXES = ("text_encoders.umt5xxl.transformer.", "umt5xxl.transformer.", "text_encoder.", "model.")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


# -- config --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UMT5Config:
    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096  # H * Dh; need not equal dim
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128  # relative distances >= this share the last bucket
    eps: float = 1e-6
    shared_pos: bool = False  # umT5: one relative position bias per layer; T5 v1.1: one shared

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"num_buckets must be even and >= 4 (bidirectional), got {self.num_buckets}")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UMT5Config":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes: Any) -> "UMT5Config":
        return dataclasses.replace(self, **changes)


UMT5_PRESETS: dict[str, UMT5Config] = {
    # Wan2.1's text encoder (wan/modules/t5.py umt5_xxl; google/umt5-xxl)
    "umt5-xxl": UMT5Config(),
    # test sizes: dim_attn != dim on purpose, so a swapped weight cannot go unnoticed
    "umt5-tiny": UMT5Config(vocab=300, dim=32, dim_attn=24, dim_ffn=48, num_heads=4, num_layers=2),
    "umt5-tiny-shared": UMT5Config(vocab=300, dim=32, dim_attn=24, dim_ffn=48, num_heads=4, num_layers=2,
                                   shared_pos=True),
}


# -- the encoder: transformers' ---------------------------------------------------------------------

def _transformers():
    try:
        import transformers
    except ImportError:
        raise CheckpointError("the umT5 text encoder of real Wan models runs on transformers: "
                              "pip install 'causvid-stream[wan]' (ComfyUI brings it)") from None
    return transformers


class UMT5Encoder(nn.Module):
    """ids [B, L] (+ mask [B, L], 1 = token, 0 = padding) -> hidden states [B, L, D].

    transformers' UMT5EncoderModel (T5EncoderModel for T5 v1.1's one shared position bias), sized by our
    UMT5Config; `load_umt5` renames any file's keys (Wan's, transformers', ComfyUI's) to its names."""

    def __init__(self, config: UMT5Config | str = "umt5-xxl"):
        super().__init__()
        cfg = UMT5_PRESETS[config] if isinstance(config, str) else config
        self.config = cfg
        tf = _transformers()
        hf_cls, model_cls = ((tf.T5Config, tf.T5EncoderModel) if cfg.shared_pos
                             else (tf.UMT5Config, tf.UMT5EncoderModel))
        hf = hf_cls(vocab_size=cfg.vocab, d_model=cfg.dim, d_kv=cfg.head_dim, d_ff=cfg.dim_ffn,
                    num_layers=cfg.num_layers, num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.num_buckets,
                    relative_attention_max_distance=cfg.max_distance, layer_norm_epsilon=cfg.eps,
                    feed_forward_proj="gated-gelu", dropout_rate=0.0, attn_implementation="eager")
        self.model = model_cls(hf)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.shared

    def forward(self, ids: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


# -- key layouts and config inference ----------------------------------------------------------

_HF_TO_WAN = [  # transformers UMT5EncoderModel / ComfyUI -> Wan's names
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight$"), r"blocks.\1.attn.\2.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$"),
     r"blocks.\1.pos_embedding.embedding.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$"), r"blocks.\1.norm1.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight$"), r"blocks.\1.ffn.gate.0.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight$"), r"blocks.\1.ffn.fc1.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight$"), r"blocks.\1.ffn.fc2.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$"), r"blocks.\1.norm2.weight"),
    (re.compile(r"^encoder\.final_layer_norm\.weight$"), "norm.weight"),
]


_WAN_TO_HF = [  # Wan's names -> transformers' (the inverse of _HF_TO_WAN), under UMT5Encoder's `model.`
    (re.compile(r"^blocks\.(\d+)\.attn\.([qkvo])\.weight$"), r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (re.compile(r"^blocks\.(\d+)\.pos_embedding\.embedding\.weight$"),
     r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight"),
    (re.compile(r"^pos_embedding\.embedding\.weight$"),  # T5 v1.1: the shared bias lives in block 0
     "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    (re.compile(r"^blocks\.(\d+)\.norm1\.weight$"), r"encoder.block.\1.layer.0.layer_norm.weight"),
    (re.compile(r"^blocks\.(\d+)\.ffn\.gate\.0\.weight$"), r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (re.compile(r"^blocks\.(\d+)\.ffn\.fc1\.weight$"), r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (re.compile(r"^blocks\.(\d+)\.ffn\.fc2\.weight$"), r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
    (re.compile(r"^blocks\.(\d+)\.norm2\.weight$"), r"encoder.block.\1.layer.1.layer_norm.weight"),
    (re.compile(r"^norm\.weight$"), "encoder.final_layer_norm.weight"),
]


def to_encoder_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Wan-named weights -> UMT5Encoder's state dict (the token table twice: transformers ties shared and
    encoder.embed_tokens). Unknown keys pass through so the strict check lists them."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k == "token_embedding.weight":
            out["model.shared.weight"] = out["model.encoder.embed_tokens.weight"] = v
            continue
        for pattern, repl in _WAN_TO_HF:
            if pattern.match(k):
                k = pattern.sub(repl, k)
                break
        out["model." + k] = v
    return out


def _strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in KEY_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def to_wan_keys(sd: dict[str, Tensor], where: str = "checkpoint") -> tuple[dict[str, Tensor], str]:
    """Either layout -> Wan's key names; returns (state dict, "wan" | "transformers").

    Decoder and LM-head weights of a full (u)mT5 checkpoint are dropped: only the encoder is used.
    Unknown keys pass through unchanged so the strict check lists them.
    """
    sd = _strip_prefix(sd)
    if "token_embedding.weight" in sd or any(k.startswith("blocks.") for k in sd):
        return dict(sd), "wan"
    hf_keys = ("shared.weight", "encoder.embed_tokens.weight")
    if not (any(k in sd for k in hf_keys) or any(k.startswith("encoder.block.") for k in sd)):
        raise CheckpointError(f"{where}: not a umT5 encoder (neither Wan's keys like token_embedding.weight nor "
                              f"transformers' like encoder.block.0...; found e.g. {sorted(sd)[:5]})")
    if any(k.endswith("DenseReluDense.wi.weight") for k in sd):
        raise CheckpointError(f"{where}: a T5 v1.0 checkpoint (ReLU feed-forward, `wi`); umT5 / T5 v1.1 with a "
                              "gated-GELU feed-forward (`wi_0`, `wi_1`) is required")
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("decoder.") or k == "lm_head.weight":
            continue
        if k in ("shared.weight", "encoder.embed_tokens.weight"):
            # tied copies of one table; transformers' save keeps only `shared.weight`
            if k == "shared.weight" or "shared.weight" not in sd:
                out["token_embedding.weight"] = v
            continue
        for pattern, repl in _HF_TO_WAN:
            if pattern.match(k):
                k = pattern.sub(repl, k)
                break
        out[k] = v
    # T5 v1.1 (not umT5) keeps a bias only in block 0 and shares it: Wan names that one `pos_embedding`
    biased = [k for k in out if k.endswith("pos_embedding.embedding.weight")]
    if biased == ["blocks.0.pos_embedding.embedding.weight"] and "blocks.1.norm1.weight" in out:
        out["pos_embedding.embedding.weight"] = out.pop("blocks.0.pos_embedding.embedding.weight")
    return out, "transformers"


def infer_umt5_config(sd: dict[str, Tensor], hf_config: Optional[dict[str, Any]] = None,
                      where: str = "checkpoint", **overrides: Any) -> UMT5Config:
    """The config from Wan-keyed tensor shapes; eps and max_distance from a transformers config.json if given."""
    try:
        vocab, dim = sd["token_embedding.weight"].shape
        dim_attn = sd["blocks.0.attn.q.weight"].shape[0]
        dim_ffn = sd["blocks.0.ffn.fc1.weight"].shape[0]
        shared_pos = "pos_embedding.embedding.weight" in sd
        num_buckets, num_heads = sd["pos_embedding.embedding.weight" if shared_pos
                                    else "blocks.0.pos_embedding.embedding.weight"].shape
    except KeyError as exc:
        raise CheckpointError(f"{where}: cannot infer the umT5 config, {exc.args[0]!r} is missing") from exc
    num_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    fields: dict[str, Any] = dict(vocab=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=num_heads,
                                  num_layers=num_layers, num_buckets=num_buckets, shared_pos=shared_pos)
    if hf_config:
        act = hf_config.get("dense_act_fn", "gelu_new")
        if not hf_config.get("is_gated_act", True) or act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"{where}: config.json asks for feed-forward {act!r} "
                                  f"(gated={hf_config.get('is_gated_act')}); only gated GELU-tanh is implemented")
        fields["max_distance"] = hf_config.get("relative_attention_max_distance", 128)
        fields["eps"] = hf_config.get("layer_norm_epsilon", 1e-6)
    fields.update(overrides)
    try:
        return UMT5Config(**fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: bad umT5 config {fields}: {exc}") from exc


# -- fp8 files: causvid_core/fp8.py (the same scaled-fp8 layout as ComfyUI's DiT files) ------------------

# -- loading -----------------------------------------------------------------------------------------

@dataclass
class _Loaded:
    sd: dict[str, Tensor]
    config: UMT5Config
    layout: str
    spiece: Optional[bytes]  # a sentencepiece model embedded in the file (ComfyUI's `spiece_model`)


def _read_umt5(path: str | os.PathLike, dtype: Optional[torch.dtype], config: Optional[UMT5Config],
               overrides: dict[str, Any]) -> _Loaded:
    where = str(path)
    try:
        raw = read_checkpoint(path)
    except OSError as exc:  # torch's zip reader says only "Invalid argument" for some truncated .pth files
        raise CheckpointError(f"{where}: unreadable checkpoint (truncated or corrupt? download it again): "
                              f"{exc}") from exc
    tensors = dict(raw.tensors)
    spiece = tensors.pop("spiece_model", None)
    spiece_bytes = None if spiece is None else spiece.to(torch.uint8).numpy().tobytes()
    floats = [t for t in tensors.values() if t.is_floating_point()]
    if not floats:
        raise CheckpointError(f"{where}: no floating-point weights in this file; not a umT5 encoder")
    had_fp8 = any(t.dtype in FP8_DTYPES for t in floats)
    if dtype is None:  # one dtype for the whole model: the weights' (the largest tensor's), bf16 for fp8 files
        dtype = torch.bfloat16 if had_fp8 else max(floats, key=lambda t: t.numel()).dtype
    dequantize(tensors, dtype, where)
    sd, layout = to_wan_keys(tensors, where)
    hf_config = json.loads(raw.metadata["folder.config"]) if "folder.config" in raw.metadata else None
    cfg = config.replace(**overrides) if config is not None else infer_umt5_config(sd, hf_config, where, **overrides)
    return _Loaded(sd, cfg, f"{raw.layout}/{layout}" + ("+fp8" if had_fp8 else ""), spiece_bytes)


def _build(loaded: _Loaded, where: str, device: torch.device | str) -> UMT5Encoder:
    with torch.device("meta"):
        model = UMT5Encoder(loaded.config)
    # checked under Wan's names, the ones the message then speaks of whatever the file's layout
    wan_names, _ = to_wan_keys({k[len("model."):]: v for k, v in model.state_dict().items()}, where)
    check_key_shapes({k: tuple(v.shape) for k, v in wan_names.items()}, loaded.sd, where)
    model.load_state_dict(to_encoder_keys(loaded.sd), strict=True, assign=True)
    model.model.tie_weights()  # assign replaced the shared table: embed_tokens points at it again
    model.checkpoint_layout = loaded.layout
    return model.to(device).eval().requires_grad_(False)


def load_umt5(path: str | os.PathLike, *, dtype: Optional[torch.dtype] = None, device: torch.device | str = "cpu",
              config: Optional[UMT5Config] = None, **config_overrides: Any) -> UMT5Encoder:
    """A umT5 encoder from Wan's .pth, a transformers folder/safetensors, or a ComfyUI text-encoder file.

    The config comes from tensor shapes (plus config.json in a folder); `config_overrides` set what
    shapes cannot tell (max_distance, eps). dtype None keeps the file's (bf16 for fp8 files).
    """
    if not Path(path).exists():
        raise CheckpointError(f"umT5 weights not found at {path}: {MISSING_FILES_HELP}")
    return _build(_read_umt5(path, dtype, config, config_overrides), str(path), device)


# -- tokenizer -----------------------------------------------------------------------------------------

def clean_prompt(text: str) -> str:
    """Wan's `clean='whitespace'`: ftfy (when installed), HTML unescaped twice, whitespace collapsed."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs mojibake; clean prompts are unaffected without it
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5Tokenizer:
    """Cleaned text -> ids [B, text_len] and mask [B, text_len]: content truncated to text_len - 1, then EOS, then pad.

    This is what T5TokenizerFast(padding="max_length", truncation=True, add_special_tokens=True) gives
    (Wan's HuggingfaceTokenizer): the EOS survives truncation.
    """

    def __init__(self, encode: Callable[[str], list[int]], eos_id: int, pad_id: int = 0, source: str = ""):
        self.encode = encode  # raw cleaned text -> ids without special tokens
        self.eos_id, self.pad_id, self.source = eos_id, pad_id, source

    def tokenize(self, text: str, text_len: int = 512) -> list[int]:
        return self.encode(clean_prompt(text))[: text_len - 1] + [self.eos_id]

    def __call__(self, prompts: Sequence[str] | str, text_len: int = 512) -> tuple[Tensor, Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = [self.tokenize(p, text_len) for p in prompts]
        ids = torch.full((len(rows), text_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), text_len, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask

    def __repr__(self) -> str:
        return f"UMT5Tokenizer({self.source!r}, eos={self.eos_id}, pad={self.pad_id})"


def _sentencepiece_tokenizer(model: bytes | str, source: str) -> UMT5Tokenizer:
    import sentencepiece as spm

    if isinstance(model, bytes):
        sp = spm.SentencePieceProcessor(model_proto=model)
    else:
        sp = spm.SentencePieceProcessor(model_file=model)
    if sp.eos_id() < 0:
        raise CheckpointError(f"{source}: the sentencepiece model has no EOS piece")
    return UMT5Tokenizer(lambda t: sp.encode(t, out_type=int), sp.eos_id(), max(sp.pad_id(), 0), source)


def _tokenizer_json(path: Path) -> UMT5Tokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    eos = tok.token_to_id("</s>")
    if eos is None:
        raise CheckpointError(f"{path}: the tokenizer has no '</s>' token; not a T5 tokenizer")
    pad = tok.token_to_id("<pad>")
    # the file's post-processor appends </s> too; we add it ourselves so truncation keeps it
    return UMT5Tokenizer(lambda t: tok.encode(t, add_special_tokens=False).ids, eos, 0 if pad is None else pad,
                         str(path))


def load_tokenizer(path: str | os.PathLike | bytes) -> UMT5Tokenizer:
    """The umT5 tokenizer from a folder (tokenizer.json, else spiece.model), either file, or the bytes
    of a sentencepiece model (ComfyUI embeds one as `spiece_model`)."""
    if isinstance(path, bytes):
        p, source = None, "embedded spiece_model"
    else:
        p = Path(path)
        if p.is_dir():
            found = next((p / f for f in TOKENIZER_FILES if (p / f).exists()), None)
            if found is None:
                raise CheckpointError(f"{p}: no umT5 tokenizer here (expected {' or '.join(TOKENIZER_FILES)}): "
                                      "download the google/umt5-xxl tokenizer folder (Wan2.1 repos ship it as "
                                      "google/umt5-xxl/)")
            p = found
        elif not p.exists():
            raise CheckpointError(f"umT5 tokenizer not found at {p}: download the google/umt5-xxl tokenizer folder "
                                  "(tokenizer.json or spiece.model; Wan2.1 repos ship it as google/umt5-xxl/)")
        source = str(p)
    try:
        if p is not None and p.suffix == ".json":
            return _tokenizer_json(p)
        return _sentencepiece_tokenizer(path if p is None else str(p), source)
    except CheckpointError:
        raise
    except ImportError as exc:
        raise CheckpointError(f"{source}: reading this tokenizer needs the `{exc.name}` package: "
                              "pip install 'causvid-stream[wan]'") from exc
    except Exception as exc:  # tokenizers and sentencepiece raise their own exception types
        raise CheckpointError(f"{source}: not a readable tokenizer (truncated or corrupt?): {exc}") from exc


# -- prompts -> [B, text_len, D] -------------------------------------------------------------------

class T5TextEncoder(nn.Module):
    """Prompts -> umT5 states [B, text_len, D], rows past each prompt's length zero (Wan's contract)."""

    def __init__(self, encoder: UMT5Encoder, tokenizer: UMT5Tokenizer, text_len: int = 512):
        super().__init__()
        if text_len < 1:
            raise ValueError(f"text_len must be at least 1 (room for the EOS token), got {text_len}")
        self.encoder, self.tokenizer = encoder, tokenizer
        self.text_len, self.text_dim = text_len, encoder.config.dim

    @torch.no_grad()
    def encode(self, prompts: Sequence[str] | str) -> Tensor:
        if not isinstance(prompts, str) and len(prompts) == 0:
            raise ValueError("encode() needs at least one prompt")
        ids, mask = self.tokenizer(prompts, self.text_len)  # [B, text_len] each, on the CPU
        # Run only up to the longest prompt: padded keys get exactly zero attention weight, so the
        # valid rows are what a run over all text_len positions gives (up to summation order).
        n = int(mask.sum(1).max())
        weight = self.encoder.token_embedding.weight
        ids, mask = ids[:, :n].to(weight.device), mask[:, :n].to(weight.device)
        states = self.encoder(ids, mask) * mask.unsqueeze(-1).to(weight.dtype)  # [B, n, D]
        out = states.new_zeros(ids.shape[0], self.text_len, self.text_dim)
        out[:, :n] = states
        return out  # [B, text_len, D]

    def forward(self, prompts: Sequence[str] | str) -> Tensor:
        return self.encode(prompts)


def _resolve_files(weights: Optional[str | os.PathLike], tokenizer: Optional[str | os.PathLike]
                   ) -> tuple[Path, Optional[Path]]:
    """Wan2.1 model folders, diffusers Wan folders and single files -> (weights, tokenizer or None)."""
    if weights is None or not Path(weights).exists():
        raise CheckpointError(f"umT5 weights not found{f' at {weights}' if weights else ''}: {MISSING_FILES_HELP}")
    w = Path(weights)
    tok = Path(tokenizer) if tokenizer is not None else None
    if w.is_dir():
        if (w / WAN_T5_FILE).exists():  # a Wan2.1 model folder: the .pth and google/umt5-xxl/
            tok = tok or w.joinpath(*WAN_TOKENIZER_SUBDIR)
            w = w / WAN_T5_FILE
        elif (w / "text_encoder").is_dir():  # a diffusers Wan folder
            tok = tok or w / "tokenizer"
            w = w / "text_encoder"
        elif tok is None and any((w / f).exists() for f in TOKENIZER_FILES):
            tok = w
    return w, tok


def load_umt5_text_encoder(weights: Optional[str | os.PathLike], tokenizer: Optional[str | os.PathLike] = None, *,
                           text_len: int = 512, dtype: Optional[torch.dtype] = None,
                           device: torch.device | str = "cpu", **config_overrides: Any) -> T5TextEncoder:
    """Weights (a file, a Wan2.1 model folder, a diffusers Wan folder) + tokenizer -> T5TextEncoder.

    The tokenizer may be omitted when it can be found: google/umt5-xxl/ in a Wan2.1 folder,
    tokenizer/ in a diffusers folder, or a sentencepiece model embedded in a ComfyUI file.
    """
    w, tok = _resolve_files(weights, tokenizer)
    tk = load_tokenizer(tok) if tok is not None else None  # before reading gigabytes of weights
    loaded = _read_umt5(w, dtype, None, config_overrides)
    if tk is None and loaded.spiece is not None:
        tk = load_tokenizer(loaded.spiece)
    elif tk is None:
        raise CheckpointError(f"umT5 tokenizer not found for {w}: pass the google/umt5-xxl tokenizer folder "
                              "(tokenizer.json or spiece.model; Wan2.1 repos ship it as google/umt5-xxl/)")
    return T5TextEncoder(_build(loaded, str(w), device), tk, text_len)
