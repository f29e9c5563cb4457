"""Shared test helpers: where shared/ lives, tiny random models, a closeness check that reports."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from causvid_core.config import DiTConfig
from causvid_core.model import WanDiT

ROOT = Path(__file__).resolve().parents[1]


def _find_shared() -> Path:
    """CAUSVID_SHARED, else shared/ beside the checkout, else (a clean `git clone .` elsewhere) beside the local
    checkout it was cloned from. The first candidate is returned when none exists, for the error message."""
    if "CAUSVID_SHARED" in os.environ:
        return Path(os.environ["CAUSVID_SHARED"])
    beside = ROOT.parent / "shared"
    if beside.is_dir():
        return beside
    try:
        origin = subprocess.run(["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        origin = ""
    if origin and Path(origin).is_dir() and (Path(origin).resolve().parent / "shared").is_dir():
        return Path(origin).resolve().parent / "shared"
    return beside


SHARED = _find_shared()
PARITY_JSON = SHARED / "parity" / "wan-tiny-seed0.json"
MANIFESTS = SHARED / "parity" / "wan_manifests.json"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    # Not a skip: CI always has shared/ beside the checkout, and a missing one must fail loudly.
    assert SHARED.is_dir(), f"shared/ not found at {SHARED}; set CAUSVID_SHARED"
    return SHARED


def tiny_model(seed: int = 0, **cfg_changes) -> WanDiT:
    """A random small Wan DiT with non-trivial weights everywhere (head not zero, modulations random)."""
    base = dict(dim=64, ffn_dim=96, num_heads=4, num_layers=2, text_dim=24, text_len=8)
    base.update(cfg_changes)
    cfg = DiTConfig(**base)
    torch.manual_seed(seed)
    model = WanDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
    return model.eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5,
                 what: str = "") -> None:
    """torch.testing.assert_close with the max / mean difference in the message."""
    diff = (actual.double() - expected.double()).abs()
    msg = f"{what}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda _: msg)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, what: str = "") -> None:
    """Relative L2 error ||a - e|| / ||e|| <= tol (the parity metric), for outputs of any scale."""
    err = ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
    assert err <= tol, f"{what}: relative L2 error {err:.3e} > {tol:.0e}"


def tiny_components(seed: int = 0, **settings):
    """A random tiny DiT + wan-tiny VAE + word text encoder, wired like the real pipeline."""
    from causvid_core.pipeline import Components
    from causvid_core.text import WordEncoderConfig, WordTextEncoder
    from causvid_core.vae import random_vae

    torch.manual_seed(seed)
    text = WordTextEncoder(WordEncoderConfig(text_dim=24, text_len=8)).eval()
    return Components(tiny_model(seed=seed), random_vae("wan-tiny", seed=seed), text, dict(settings))
