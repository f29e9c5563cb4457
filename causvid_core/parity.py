"""Parity runner: reproduce the reference implementations' outputs stored in a parity file.

A parity file is NAME.json (configs and sizes) beside NAME.safetensors (weights, inputs, outputs);
the format is shared/parity/README.md. Every size is read from the file. Cases:
- bidir.out{i}: the bidirectional DiT at timestep bidir.t{i};
- causal.out: the block-causal full-sequence forward with per-frame timesteps;
- ar_causvid.out: the KV-cached Algorithm-2 rollout, cache holding every frame;
- ar_rolling.out: the same loop with a rolling cache and sink frames (Self-Forcing);
- ar_first_chunk*.out, ar_i2v.out: Causal Forcing's loops (the first chunk's own steps; a clean image prefix);
- ar_recompute.out: Krea Realtime's loop (the cache rebuilt from clean frames before every chunk);
- any other case kind is reported as a failure (unknown to this version), never skipped;
- vae.latent / vae.decoded: the VAE's chunked encode and decode (see vae_parity.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from .cache import KVCache
from .checkpoints import check_keys
from .config import DiTConfig
from .flow import FlowGrid
from .model import WanDiT
from .sampler import causal_rollout

TOLERANCE = 1e-4  # relative L2 error per output tensor (shared/parity/README.md)


@dataclass
class CaseResult:
    name: str
    rel_err: float  # nan when the case could not be run
    note: str = ""

    @property
    def ok(self) -> bool:
        return math.isfinite(self.rel_err) and self.rel_err <= TOLERANCE


def rel_err(out: Tensor, ref: Tensor) -> float:
    if out.shape != ref.shape:
        raise ValueError(f"shape {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


class ParityFile:
    def __init__(self, json_path: str | Path):
        from safetensors.torch import load_file

        self.json_path = Path(json_path)
        self.meta = json.loads(self.json_path.read_text())
        st = self.json_path.with_suffix(".safetensors")
        if not st.exists():
            raise FileNotFoundError(f"{st}: the tensors of {self.json_path.name} must lie beside it")
        self.tensors = load_file(str(st))

    def group(self, prefix: str) -> dict[str, Tensor]:
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


# -- DiT cases ---------------------------------------------------------------------------------

def build_dit(pf: ParityFile) -> WanDiT:
    cfg = DiTConfig.from_dict(pf.meta["dit_config"])
    sd = pf.group("dit")
    with torch.device("meta"):
        model = WanDiT(cfg)
    check_keys(model, sd, str(pf.json_path))
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def _video(x: Tensor) -> Tensor:
    """[C, F, H, W] -> [1, C, F, H, W]."""
    return x.unsqueeze(0)


def _frame_major(x: Tensor) -> Tensor:
    """[F, C, H, W] (the reference's frame-major layout) -> [1, C, F, H, W]."""
    return x.permute(1, 0, 2, 3).unsqueeze(0)


def _rollout_case(pf: ParityFile, model: WanDiT, context: Tensor, name: str) -> Tensor:
    spec = pf.meta[name]
    noise = _frame_major(pf.tensors[f"{name}.noise"])  # [1, C, F, H, W]
    renoise = pf.tensors[f"{name}.renoise"]  # [chunks, steps-1, f, C, H, W]
    steps = pf.tensors[f"{name}.steps"].tolist() if f"{name}.steps" in pf.tensors else list(spec["steps"])
    F, H, W = noise.shape[2:]
    T = model.config.tokens_per_frame(H, W)
    block = int(spec["frames_per_block"])
    if "local_attn_frames" in spec and int(spec["local_attn_frames"]) > 0:
        cache = KVCache.window(model.config, batch=1, tokens_per_frame=T, window_frames=int(spec["local_attn_frames"]),
                               sink_frames=int(spec.get("sink_frames", 0)))
    else:
        cache = KVCache.full(model.config, batch=1, tokens_per_frame=T, frames=F)

    def noise_fn(chunk: int, step: int, shape: tuple[int, ...]) -> Tensor:
        return _frame_major(renoise[chunk, step])

    out = causal_rollout(model, noise, context, steps, FlowGrid(float(spec["shift"])), cache=cache,
                         chunk_frames=block, noise_fn=noise_fn)
    return out[0].permute(1, 0, 2, 3)  # back to frame-major [F, C, H, W]


def _stream_case(pf: ParityFile, model: WanDiT, context: Tensor, name: str) -> Tensor:
    """A newer system's loop (shared/parity/README.md) as CausalStream runs it, fed the file's noise:
    ar_first_chunk*: the first chunk's own step list (Causal Forcing); ar_i2v: a clean prefix written to the
    cache first; ar_recompute: Krea's cache rebuilt before every chunk."""
    from .stream import INIT_NOISE_STEP, CausalStream, StreamSettings

    spec, t = pf.meta[name], pf.group(name)
    noise = _frame_major(t["noise"])  # [1, C, F', H, W]: the generated frames' starting noise
    steps = t["steps"].tolist() if "steps" in t else list(spec["steps"])
    first = t["steps_first_chunk"].tolist() if "steps_first_chunk" in t else spec.get("steps_first_chunk")
    fpb, F = int(spec["frames_per_block"]), int(spec["frames"])
    settings = StreamSettings(steps=tuple(steps), shift=float(spec["shift"]), chunk_frames=fpb, max_frames=F,
                              first_chunk_steps=tuple(first) if first else None,
                              kv_recompute_frames=int(spec["kv_recompute_frames"]) if "kv_recompute_frames" in spec
                              else int(spec["kv_cache_num_frames"]) if name == "ar_recompute" else None)
    stream = CausalStream(model, settings, latent_hw=tuple(noise.shape[-2:]))
    stream.set_prompt(context)
    renoise, renoise_first = t["renoise"], t.get("renoise_first")

    def noise_fn(chunk: int, step: int, shape: tuple[int, ...]) -> Tensor:
        if step == INIT_NOISE_STEP:
            return noise[:, :, chunk * fpb:chunk * fpb + shape[2]]
        if renoise_first is not None:  # block 0 has its own draws, the others follow
            return _frame_major(renoise_first[step] if chunk == 0 else renoise[chunk - 1, step])
        return _frame_major(renoise[chunk, step])

    stream.noise = noise_fn
    out = []
    if "prefix" in t:
        out.append(stream.add_context(_frame_major(t["prefix"])).latents)
    while stream.frame < F:
        out.append(stream.step().latents)
    return torch.cat(out, dim=2)[0].permute(1, 0, 2, 3)  # frame-major [F, C, H, W]


def dit_cases(pf: ParityFile) -> Iterator[CaseResult]:
    """Every DiT case present in the file (or expected by its JSON), computed and compared."""
    model = build_dit(pf)
    t = pf.tensors
    context = t["context"].unsqueeze(0)  # [1, Lc, text_dim]
    with torch.no_grad():
        x = _video(t["bidir.x"])
        i = 0
        while f"bidir.t{i}" in t:
            yield _compare(f"bidir.out{i}", lambda: model(x, t[f"bidir.t{i}"], context)[0], t.get(f"bidir.out{i}"))
            i += 1
        if i == 0:
            yield CaseResult("bidir", float("nan"), "missing: no bidir.t0 in the file")
        block = int(pf.meta.get("causal", {}).get("frames_per_block")
                    or pf.meta.get("ar_causvid", {}).get("frames_per_block", 3))
        yield _compare("causal.out", lambda: model(x, t["causal.t"].unsqueeze(0), context, chunk_frames=block)[0],
                       t.get("causal.out"), needs=("causal.t",), have=t)
    for name in ("ar_causvid", "ar_rolling"):
        if name in pf.meta or f"{name}.out" in t:
            yield _compare(f"{name}.out", lambda: _rollout_case(pf, model, context, name), t.get(f"{name}.out"),
                           needs=(f"{name}.noise", f"{name}.renoise"), have=t)
    # newer systems' loops, run through CausalStream itself with the file's noise
    for name in sorted(k for k in pf.meta if k.startswith("ar_") and k not in ("ar_causvid", "ar_rolling")):
        if name.startswith("ar_first_chunk"):
            needs = ("noise", "renoise", "renoise_first")
        elif name == "ar_i2v":
            needs = ("noise", "renoise", "prefix")
        elif name == "ar_recompute":
            needs = ("noise", "renoise")
        else:  # a loop this version does not know: a failure, never a silent skip
            yield CaseResult(f"{name}.out", float("nan"), "unknown case kind: this version cannot check it")
            continue
        yield _compare(f"{name}.out", lambda: _stream_case(pf, model, context, name), t.get(f"{name}.out"),
                       needs=tuple(f"{name}.{k}" for k in needs), have=t)
    known = {"dit", "context", "bidir", "causal", *(k for k in pf.meta if k.startswith("ar_")), "vae"}
    for group in sorted({k.split(".", 1)[0] for k in t} - known):
        yield CaseResult(f"{group}.*", float("nan"), "unknown case kind: this version cannot check it")


def _compare(name: str, run: Callable[[], Tensor], ref: Optional[Tensor], needs: tuple[str, ...] = (),
             have: Optional[dict] = None) -> CaseResult:
    absent = [k for k in needs if have is not None and k not in have]
    if ref is None or absent:
        return CaseResult(name, float("nan"), f"missing: {[name] if ref is None else absent}")
    try:
        return CaseResult(name, rel_err(run(), ref))
    except Exception as exc:  # a case that cannot run is a failure, reported, not a crash
        return CaseResult(name, float("nan"), f"error: {type(exc).__name__}: {exc}")


# -- the command -------------------------------------------------------------------------------

def run_parity(json_path: str | Path, only: Optional[str] = None, out=print) -> bool:
    """Run the file's cases, print a table and the summary line; True when every case passes."""
    pf = ParityFile(json_path)
    results: list[CaseResult] = []
    if only in (None, "dit"):
        if "dit_config" not in pf.meta:
            results.append(CaseResult("dit", float("nan"), "missing: no dit_config in the file"))
        else:
            results.extend(dit_cases(pf))
    if only in (None, "vae"):
        if "vae_config" in pf.meta or any(k.startswith("vae.") for k in pf.tensors):
            from .vae_parity import vae_cases
            results.extend(vae_cases(pf))
        elif only == "vae":
            results.append(CaseResult("vae", float("nan"), "missing: no vae_config in the file"))
    if not results:
        results.append(CaseResult("(none)", float("nan"), "missing: the file has no cases"))
    width = max(16, *(len(r.name) for r in results))
    out(f"{'case':<{width}} {'rel err':>10}  status")
    for r in results:
        status = "ok" if r.ok else ("FAIL " + r.note if r.note else "FAIL")
        out(f"{r.name:<{width}} {r.rel_err:>10.3e}  {status}")
    worst = max((r.rel_err if math.isfinite(r.rel_err) else float("inf")) for r in results)
    out(f"parity: {len(results)} cases, max rel err {worst:.3e}")
    return all(r.ok for r in results)
