"""The Wan2.1 DiT with block-causal and KV-cached forwards (CausVid / Self-Forcing CausalWanModel).

Parameter names are Wan2.1's, so every Wan2.1, CausVid, Self-Forcing and LongLive state dict loads
with strict=True. One module, three ways to run it (all through `forward`):
- bidirectional: t [B], full attention (the teacher and the DMD critic);
- block-causal over a whole sequence: t [B, F] per frame and `chunk_frames` (student training);
- KV-cached, one chunk at a time from an absolute `start_frame` (inference): pass `cache`.

Shapes: B batch, C latent channels, F latent frames, H x W latent grid, h x w token grid
(H/2 x W/2), T = h*w tokens per frame, L = F*T tokens, D model dim, N heads, d head dim,
Lc context rows (>= text_len after zero-padding).
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Optional, Sequence

import torch
import torch.utils.checkpoint
import torch.nn as nn
from torch import Tensor

from .attention import AttentionFn, get_attention
from .cache import KVCache
from .config import DiTConfig
from .precision import exact_dtype
from .rope import Rope, apply_rope

# (layer, q, k, v) -> attention output, all [B, N, L, d]
AttendFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]


class WanRMSNorm(nn.Module):
    """RMSNorm over the full dim (before splitting heads), in float32, times a learned weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (affine only where Wan has weights: norm3)."""

    def __init__(self, dim: int, eps: float, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: Tensor) -> Tensor:
        # float32 weights too: CUDA's layer norm refuses a float32 input with bf16 / fp16 weights
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return nn.functional.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def sinusoidal_embedding(dim: int, t: Tensor) -> Tensor:
    """t [...] raw timesteps -> [..., dim]: cat(cos, sin) with w_i = 10000^(-i/(dim/2)); float64 on the
    CPU as in Wan, float32 elsewhere (precision.py)."""
    half = dim // 2
    dt = exact_dtype(t.device)
    t = t.to(dt)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=dt, device=t.device) / half)
    angles = t.unsqueeze(-1) * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor, frames: int) -> Tensor:
    """x [B, L, D] with per-frame shift/scale [B, F or 1, 1, D]; computed in float32 like Wan."""
    B, L, D = x.shape
    x4 = x.float().view(B, frames, L // frames, D)  # [B, F, T, D]
    return (x4 * (1 + scale) + shift).view(B, L, D)


def gated_add(x: Tensor, y: Tensor, gate: Tensor, frames: int) -> Tensor:
    """x + y * gate with a per-frame gate [B, F or 1, 1, D], in float32."""
    B, L, D = y.shape
    # the sum is a fresh tensor, not a view (FSDP warns of a block returning a view: in-place ops would skip hooks)
    out = x.float() + (y.float().view(B, frames, L // frames, D) * gate).view(B, L, D)
    return out.type_as(x)


def _modulation(module: nn.Module) -> Tensor:
    """A block's (or the head's) modulation: its own Parameter, or the one of the ComfyUI block it runs on
    (`modulation_source`, nodes/comfy_model.py)."""
    source = getattr(module, "modulation_source", None)
    return source.modulation if source is not None else module.modulation


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.dim
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.norm_q = WanRMSNorm(D, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(D, cfg.eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x: Tensor, rope: Tensor, attend: AttendFn, layer: int) -> Tensor:
        B, L, D = x.shape
        N, d = self.num_heads, self.head_dim
        q = apply_rope(self.norm_q(self.q(x)).view(B, L, N, d), rope)  # [B, L, N, d]
        k = apply_rope(self.norm_k(self.k(x)).view(B, L, N, d), rope)
        v = self.v(x).view(B, L, N, d)
        out = attend(layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, N, L, d]
        return self.o(out.transpose(1, 2).reshape(B, L, D))


class CrossAttention(nn.Module):
    """Text cross-attention (no RoPE, no mask); i2v adds a second attention over CLIP image tokens."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.dim
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.norm_q = WanRMSNorm(D, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(D, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.has_image = cfg.model_type == "i2v"
        if self.has_image:
            self.k_img, self.v_img = nn.Linear(D, D), nn.Linear(D, D)
            self.norm_k_img = WanRMSNorm(D, cfg.eps) if cfg.qk_norm else nn.Identity()

    def _heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # [B, N, L, d]

    def context_kv(self, context: Tensor, context_img: Optional[Tensor]) -> tuple[Tensor, ...]:
        """K/V of the (embedded) context, each [B, N, Lc, d]: what the cross-attention cache keeps."""
        kv = (self._heads(self.norm_k(self.k(context))), self._heads(self.v(context)))
        if self.has_image:
            kv += (self._heads(self.norm_k_img(self.k_img(context_img))), self._heads(self.v_img(context_img)))
        return kv

    def forward(self, x: Tensor, kv: tuple[Tensor, ...], attention: AttentionFn) -> Tensor:
        B, L, D = x.shape
        q = self._heads(self.norm_q(self.q(x)))
        out = attention(q, kv[0], kv[1])
        if self.has_image:
            out = out + attention(q, kv[2], kv[3])
        return self.o(out.transpose(1, 2).reshape(B, L, D))


class CrossKV:
    """One context's cross-attention K/V, layer by layer. Each block makes its own inside its forward, where
    its weights are (a block sharded by FSDP has them gathered only there), and without gradients keeps it
    in `store` (a KV cache's per-layer list: made once per prompt) when there is one."""

    def __init__(self, ctx: Optional[Tensor], ctx_img: Optional[Tensor], store: Optional[list] = None,
                 fresh: bool = False):
        self.ctx, self.ctx_img, self.store = ctx, ctx_img, store  # ctx [B, Lc, D] (None: every layer stored)
        self.fresh = fresh  # a pass that trains the model: never stored nor read from the store

    def layer(self, i: int, attn: "CrossAttention") -> tuple[Tensor, ...]:
        if self.fresh:
            # training: made afresh each pass, so the K/V weights and the text embedding get their gradient
            # from every chunk, and a block recomputed for checkpointing does the same work as its forward
            return attn.context_kv(self.ctx, self.ctx_img)
        if self.store is not None and self.store[i] is not None:
            return self.store[i]
        kv = attn.context_kv(self.ctx, self.ctx_img)
        if self.store is not None:
            self.store[i] = kv
        return kv


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.dim
        self.norm1 = WanLayerNorm(D, cfg.eps)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = WanLayerNorm(D, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = WanLayerNorm(D, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(D, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, D))
        self.modulation = nn.Parameter(torch.randn(1, 6, D) / D ** 0.5)

    def forward(self, x: Tensor, e0: Tensor, frames: int, rope: Tensor, attend: AttendFn, layer: int,
                cross: "CrossKV", attention: AttentionFn) -> Tensor:
        # e0 [B, F or 1, 6, D] -> six [B, F or 1, 1, D]
        mod = _modulation(self).to(device=e0.device, dtype=e0.dtype)  # stored in the weights' dtype (fp8 too)
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod.unsqueeze(1) + e0).chunk(6, dim=2)
        y = self.self_attn(modulate(self.norm1(x), shift1, scale1, frames).type_as(x), rope, attend, layer)
        x = gated_add(x, y, gate1, frames)
        x = x + self.cross_attn(self.norm3(x), cross.layer(layer, self.cross_attn), attention)
        y = self.ffn(modulate(self.norm2(x), shift2, scale2, frames).type_as(x))
        return gated_add(x, y, gate2, frames)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: Tensor, e: Tensor, frames: int) -> Tensor:
        # e [B, F or 1, D] (the time embedding before the 6-way projection, as in Wan)
        mod = _modulation(self).to(device=e.device, dtype=e.dtype)
        shift, scale = (mod.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)  # [B, F|1, 1, D]
        return self.head(modulate(self.norm(x), shift, scale, frames).type_as(x))


class MLPProj(nn.Module):
    """i2v: CLIP image features [B, 257, 1280] -> context tokens [B, 257, D]."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def chunk_sizes(num_frames: int, chunk_frames: int | Sequence[int]) -> list[int]:
    """[3, 3, 3] for 9 frames of 3; a list such as [1, 3, 3] (independent first frame) is checked and kept."""
    if isinstance(chunk_frames, int):
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        sizes = [chunk_frames] * (num_frames // chunk_frames)
        if num_frames % chunk_frames:
            sizes.append(num_frames % chunk_frames)
        return sizes
    sizes = [int(s) for s in chunk_frames]
    if sum(sizes) != num_frames or min(sizes) < 1:
        raise ValueError(f"chunk sizes {sizes} do not split {num_frames} frames")
    return sizes


class WanDiT(nn.Module):
    def __init__(self, config: DiTConfig, attention: str | AttentionFn = "sdpa"):
        super().__init__()
        cfg = self.config = config
        D = cfg.dim
        self.attention = get_attention(attention)
        self.patch_embedding = nn.Conv3d(cfg.in_dim, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        if cfg.model_type == "i2v":
            self.img_emb = MLPProj(cfg.clip_dim, D)
        self._rope: Optional[Rope] = None  # plain attribute: Wan's state dict has no RoPE table
        # the dtype activations run in when it is not the weights' (ComfyUI's fp8 storage with a cast per
        # layer: comfy_model.py); None: the weights' dtype
        self.compute_dtype_override: Optional[torch.dtype] = None
        # training: keep only each block's input and recompute the block in the backward pass (activation
        # checkpointing: far less memory for a little more compute); not through a rolling KV cache
        self.gradient_checkpointing = False

    # -- setup ---------------------------------------------------------------------------------
    def set_attention(self, backend: str | AttentionFn) -> None:
        self.attention = get_attention(backend)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Wan's initialisation: xavier-uniform linears, zero biases, N(0, .02) embeddings, zero head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        for blk in self.blocks:
            blk.modulation.normal_(0, 1 / self.config.dim ** 0.5)
        self.head.modulation.normal_(0, 1 / self.config.dim ** 0.5)
        nn.init.zeros_(self.head.head.weight)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations, the KV cache and the stream's latents use."""
        return self.compute_dtype_override or self.text_embedding[0].weight.dtype

    def rope(self, device: Optional[torch.device] = None) -> Rope:
        """The RoPE tables on `device` (the activations' device; default: the patch embedding's)."""
        device = device if device is not None else self.patch_embedding.weight.device
        if self._rope is None or self._rope.device != device:
            self._rope = Rope(self.config.head_dim, device)
        return self._rope

    # -- pieces shared by every mode --------------------------------------------------------------
    def embed_context(self, context: Tensor, clip_fea: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """context [B, Lc, text_dim] (zero-padded here to text_len, unmasked as in Wan) -> [B, Lc', D]."""
        if context.dim() == 2:
            context = context.unsqueeze(0)
        B, Lc, C = context.shape
        if C != self.config.text_dim:
            raise ValueError(f"context has {C} channels, the model expects text_dim={self.config.text_dim}")
        if Lc < self.config.text_len:
            context = torch.cat([context, context.new_zeros(B, self.config.text_len - Lc, C)], dim=1)
        dt = self.compute_dtype
        ctx = self.text_embedding(context.to(dt))
        ctx_img = None
        if self.config.model_type == "i2v":
            if clip_fea is None:
                raise ValueError("an i2v model needs clip_fea (CLIP image features)")
            ctx_img = self.img_emb(clip_fea.to(dt))
        return ctx, ctx_img

    def cross_kv(self, context: Tensor, clip_fea: Optional[Tensor] = None,
                 store: Optional[list] = None) -> "CrossKV":
        """The cross-attention K/V of a context, each layer's made by its block (kept in `store`, a cache's
        per-layer list, which is only embedded again when a layer's entry is missing). In a pass that trains
        the model (gradients on, trainable weights) they are made afresh every time."""
        fresh = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if store is not None and all(kv is not None for kv in store) and not fresh:
            return CrossKV(None, None, store)
        return CrossKV(*self.embed_context(context, clip_fea), store, fresh=fresh)

    def time_embed(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """t [B] or [B, F] -> e [B, F|1, D] and e0 [B, F|1, 6, D], float32."""
        if t.dim() == 1:
            t = t.unsqueeze(1)
        dt = self.compute_dtype
        e = self.time_embedding(sinusoidal_embedding(self.config.freq_dim, t).float().to(dt)).float()
        e0 = self.time_projection(e.to(dt)).float().unflatten(-1, (6, self.config.dim))
        return e, e0

    def patchify(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """[B, C, F, H, W] -> tokens [B, L, D] and the token grid (F', h, w)."""
        w = self.patch_embedding.weight  # float32 in ComfyUI's Wan, whatever the other weights are
        x = self.patch_embedding(x.to(w.dtype)).to(self.compute_dtype)  # [B, D, F', h, w]
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, L, p0*p1*p2*C] -> [B, C, F'*p0, h*p1, w*p2]."""
        B = x.shape[0]
        f, h, w = grid
        p0, p1, p2 = self.config.patch_size
        C = self.config.out_dim
        x = x.view(B, f, h, w, p0, p1, p2, C)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, f, p0, h, p1, w, p2]
        return x.reshape(B, C, f * p0, h * p1, w * p2)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, context: Tensor, *,
                chunk_frames: int | Sequence[int] | None = None,
                cache: Optional[KVCache] = None, start_frame: int = 0,
                clip_fea: Optional[Tensor] = None, y: Optional[Tensor] = None) -> Tensor:
        """Flow prediction (noise - x0) for x [B, C, F, H, W] at raw timesteps t [B] or [B, F].

        chunk_frames: None = bidirectional; an int or a list of chunk sizes = block-causal mask
        (token i sees token j iff chunk(j) <= chunk(i)). cache: KV-cached chunk forward, x is the
        chunk and start_frame its absolute first frame. y: i2v conditioning channels, concatenated to x.
        """
        cfg = self.config
        if x.dim() != 5:
            raise ValueError(f"x must be [B, C, F, H, W], got shape {tuple(x.shape)}")
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.shape[1] != cfg.in_dim:
            raise ValueError(f"x has {x.shape[1]} channels, the model expects in_dim={cfg.in_dim}")
        B, _, F = x.shape[:3]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape not in ((B,), (B, F)):
            raise ValueError(f"t must be [B] or [B, F] = [{B}] or [{B}, {F}], got {tuple(t.shape)}")
        if cache is not None and chunk_frames is not None:
            raise ValueError("pass either a cache (chunk forward) or chunk_frames (block-causal), not both")

        tokens, grid = self.patchify(x)  # [B, L, D]
        f, h, w = grid
        T = h * w
        e, e0 = self.time_embed(t)
        attention = self.attention

        if cache is not None:
            if cache.batch != B or cache.tokens_per_frame != T:
                raise ValueError(f"cache was built for batch {cache.batch} x {cache.tokens_per_frame} tokens/frame, "
                                 f"got {B} x {T}")
            slots = cache.begin(start_frame, f)
            rope = self.rope(tokens.device).factors(slots.rope_start, f, h, w)
            source = (context, clip_fea)
            if cache.cross_source is None or cache.cross_source[0] is not context or cache.cross_source[1] is not clip_fea:
                cache.reset_cross()
                cache.cross_source = source
            cross = self.cross_kv(context, clip_fea, store=cache.cross)

            def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                kw, vw = cache.update(layer, k.to(cache.dtype), v.to(cache.dtype), slots)
                return attention(q, kw.to(q.dtype), vw.to(q.dtype))
        else:
            rope = self.rope(tokens.device).factors(start_frame, f, h, w)
            cross = self.cross_kv(context, clip_fea)
            if chunk_frames is None:
                def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                    return attention(q, k, v)
            else:
                ends = [T * e for e in itertools.accumulate(chunk_sizes(f, chunk_frames))]  # host ints, no tensor
                starts = [0] + ends[:-1]

                def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                    # chunk i's queries see keys of chunks 0..i: one attention call per chunk, no mask
                    return torch.cat([attention(q[:, :, s:e_], k[:, :, :e_], v[:, :, :e_])
                                      for s, e_ in zip(starts, ends)], dim=2)

        frames = e0.shape[1]  # 1 (one timestep per sample) or f (per-frame timesteps)
        # recomputing a cached chunk's block rewrites its own slots and reads the past before them, which a
        # full cache still holds at backward time (the rollout of Self-Forcing's training); a rolling one has moved
        checkpoint = self.gradient_checkpointing and torch.is_grad_enabled() and (cache is None or not cache.rolling)
        for i, blk in enumerate(self.blocks):
            if checkpoint:
                tokens = torch.utils.checkpoint.checkpoint(blk, tokens, e0, frames, rope, attend, i, cross,
                                                           attention, use_reentrant=False)
            else:
                tokens = blk(tokens, e0, frames, rope, attend, i, cross, attention)
        out = self.head(tokens, e, frames)
        return self.unpatchify(out, grid).float()
