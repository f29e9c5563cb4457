"""VAE parity cases: the reference's chunked encode and decode on a parity file's weights.

- vae.latent: encode `vae.video` [3, T, H, W] (chunks of 1, 4, 4, ... frames) -> normalised mean;
- vae.decoded: decode the file's `vae.latent` [16, F, h, w] (de-normalise, conv2, decoder one latent
  frame at a time), not clamped.
The VAE is built from `vae_config` + `vae_latent_mean` / `vae_latent_std` and the `vae.*` weights;
every size comes from the file.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .checkpoints import check_keys
from .parity import CaseResult, ParityFile, rel_err
from .vae import VAEConfig, WanVAE

DATA_KEYS = ("video", "latent", "decoded")  # inputs/outputs stored under vae.*, not weights


def build_vae(pf: ParityFile) -> WanVAE:
    fields = dict(pf.meta["vae_config"])
    for name in ("latent_mean", "latent_std"):
        if f"vae_{name}" in pf.meta:
            fields[name] = pf.meta[f"vae_{name}"]
    sd = {k: v for k, v in pf.group("vae").items() if k not in DATA_KEYS}
    with torch.device("meta"):
        vae = WanVAE(VAEConfig.from_dict(fields))
    check_keys(vae, sd, str(pf.json_path))
    vae.load_state_dict(sd, strict=True, assign=True)
    return vae.float().eval()


def vae_cases(pf: ParityFile) -> Iterator[CaseResult]:
    t = pf.tensors
    if "vae_config" not in pf.meta:
        yield CaseResult("vae", float("nan"), "missing: no vae_config in the file")
        return
    try:
        vae = build_vae(pf)
    except Exception as exc:  # wrong or absent weights: report, do not crash the run
        yield CaseResult("vae", float("nan"), f"error: {type(exc).__name__}: {exc}")
        return
    cases = (("vae.latent", "vae.video", lambda x: vae.encode(x)),
             ("vae.decoded", "vae.latent", lambda z: vae.decode(z, clamp=False)))
    for name, source, run in cases:
        if name not in t or source not in t:
            yield CaseResult(name, float("nan"), f"missing: {[k for k in (source, name) if k not in t]}")
            continue
        try:
            with torch.no_grad():
                out = run(t[source].float().unsqueeze(0))[0]  # [C, T, H, W] -> batch of one and back
            yield CaseResult(name, rel_err(out, t[name]))
        except Exception as exc:
            yield CaseResult(name, float("nan"), f"error: {type(exc).__name__}: {exc}")
