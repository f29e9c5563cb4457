"""causvid_core.checkpoints: every DiT layout users hold is recognised and round-trips exactly.

Each test writes a small file in a real layout (shared/reference/causal-wan.md sections 1 and 5) from a
randomly initialised tiny WanDiT, loads it with `load_dit`, and compares state dict and forward output
with the model it came from. Bad files must give a CheckpointError that names the problem.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from causvid_core import checkpoints as C
from causvid_core import model as model_module
from causvid_core.checkpoints import (CheckpointError, atomic_save_safetensors, infer_dit_config, is_lora,
                                      load_dit, merge_lora, normalize_dit_keys, read_checkpoint, save_dit)
from causvid_core.config import DIT_PRESETS, DiTConfig
from causvid_core.model import WanDiT
from conftest import tiny_model

TINY = DIT_PRESETS["wan-tiny"]
TINY_I2V = DIT_PRESETS["wan-tiny-i2v"]
# Wan-like, dim a multiple of 128 so num_heads can be inferred (dim / 128); Wan's text_len 512.
WANLIKE = DiTConfig(dim=256, ffn_dim=64, num_heads=2, num_layers=1, text_dim=32)
# every Linear of a block: LongLive's LoRA targets
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
WAN_JSON_FIELDS = ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "model_type", "num_heads",
                   "num_layers", "out_dim", "text_len")  # what Wan2.1's config.json carries


# -- helpers -----------------------------------------------------------------------------------

def random_model(cfg: DiTConfig, seed: int) -> WanDiT:
    """Every parameter random (Wan's init zeroes the head and biases: a weak test of loading), at scales
    that keep activations O(1), so rounding differences are not amplified into large output changes."""
    g = torch.Generator().manual_seed(seed)
    model = WanDiT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(noise * p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def model_inputs(cfg: DiTConfig, context_len: int | None = None) -> dict:
    g = torch.Generator().manual_seed(123)
    lc = cfg.text_len if context_len is None else context_len
    kw = dict(x=torch.randn(1, cfg.in_dim, 2, 4, 4, generator=g), t=torch.tensor([637.0]),
              context=torch.randn(1, lc, cfg.text_dim, generator=g))
    if cfg.model_type == "i2v":
        kw["clip_fea"] = torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=g)
    return kw


def run(model: WanDiT, cfg: DiTConfig, context_len: int | None = None) -> torch.Tensor:
    kw = model_inputs(cfg, context_len)
    with torch.no_grad():
        return model(kw.pop("x"), kw.pop("t"), kw.pop("context"), **kw)


def sd_of(model: WanDiT) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(loaded: WanDiT, expected: dict[str, torch.Tensor]) -> None:
    got = loaded.state_dict()
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), f"{k} differs"


def assert_same_model(loaded: WanDiT, original: WanDiT, context_len: int | None = None) -> None:
    """Same state dict, bit for bit, and the same forward output on a fixed input."""
    assert_same_weights(loaded, sd_of(original))
    assert not loaded.training
    out_loaded = run(loaded, original.config, context_len)  # the same inputs on both sides
    out_orig = run(original, original.config, context_len)
    assert out_orig.abs().max() > 0.1
    # identical weights; only the memory alignment of the tensors read can change the kernels' rounding
    torch.testing.assert_close(out_loaded, out_orig, rtol=1e-5, atol=1e-5)


def wan_config_json(cfg: DiTConfig) -> str:
    d = {"_class_name": "WanModel", "_diffusers_version": "0.30.0"}
    d.update({k: getattr(cfg, k) for k in WAN_JSON_FIELDS})
    return json.dumps(d, indent=2)


def fsdp_key(k: str) -> str:
    """blocks.0.self_attn.q.weight ->
    model._fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.self_attn.q.weight (Self-Forcing's EMA)."""
    parts = k.split(".")
    if parts[0] == "blocks":
        k = ".".join(parts[:2] + ["_fsdp_wrapped_module"] + parts[2:])
    return "model._fsdp_wrapped_module." + k


@pytest.fixture(scope="module")
def tiny() -> WanDiT:
    return random_model(TINY, seed=0)


@pytest.fixture(scope="module")
def tiny_sd(tiny) -> dict[str, torch.Tensor]:
    return sd_of(tiny)


def save_plain(sd: dict[str, torch.Tensor], path: Path, prefix: str = "", metadata=None) -> Path:
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def save_ours(sd: dict[str, torch.Tensor], cfg: DiTConfig, path: Path) -> Path:
    """Our format (config in the metadata) with an arbitrary, possibly damaged, state dict."""
    meta = {C.META_FORMAT: C.FORMAT_TAG, C.META_KIND: "dit", C.META_CONFIG: cfg.to_json()}
    atomic_save_safetensors(sd, path, meta)
    return path


# -- 1. our own safetensors ----------------------------------------------------------------------

def test_own_format_round_trip_uses_metadata_config(tmp_path, tiny, monkeypatch):
    path = tmp_path / "tiny.safetensors"
    save_dit(tiny, path, extra_metadata={"causvid.note": "hello"})
    raw = read_checkpoint(path)
    assert raw.metadata[C.META_KIND] == "dit" and raw.metadata["causvid.note"] == "hello"
    assert DiTConfig.from_dict(json.loads(raw.metadata[C.META_CONFIG])) == TINY

    # dim 96 cannot be inferred from shapes (96 % 128 != 0): the config must come from the metadata
    monkeypatch.setattr(C, "infer_dit_config", lambda *a, **k: pytest.fail("config was guessed"))
    loaded = load_dit(path)
    assert loaded.config == tiny.config
    assert loaded.checkpoint_layout == "safetensors"
    assert_same_model(loaded, tiny)
    assert not list(tmp_path.glob("*.tmp")), "atomic save left a temporary file"


def test_own_format_overrides_and_explicit_config(tmp_path, tiny):
    path = tmp_path / "tiny.safetensors"
    save_dit(tiny, path)
    assert load_dit(path, text_len=7).config == TINY.replace(text_len=7)
    assert load_dit(path, config=TINY.replace(eps=1e-5)).config.eps == 1e-5
    with pytest.raises(CheckpointError, match="mismatch"):
        load_dit(path, config=TINY.replace(ffn_dim=128))


def test_file_of_another_kind_is_refused(tmp_path, tiny_sd):
    path = tmp_path / "vae.safetensors"
    atomic_save_safetensors(tiny_sd, path, {C.META_KIND: "vae"})
    with pytest.raises(CheckpointError, match="'vae'.*not a DiT"):
        load_dit(path)


# -- 2./3. Wan2.1 folders ------------------------------------------------------------------------

def test_wan_folder_single_file(tmp_path, tiny, tiny_sd):
    folder = tmp_path / "Wan2.1-T2V-tiny"
    folder.mkdir()
    (folder / "config.json").write_text(wan_config_json(TINY))  # no text_dim: Wan's file has none
    save_plain(tiny_sd, folder / "diffusion_pytorch_model.safetensors")
    (folder / "Wan2.1_VAE.pth").write_bytes(b"not read")  # the other files of a Wan folder
    (folder / "models_t5_umt5-xxl-enc-bf16.safetensors").write_bytes(b"not read either")
    (folder / "google").mkdir()
    loaded = load_dit(folder)
    assert loaded.checkpoint_layout == "folder"
    assert loaded.config == TINY
    assert_same_model(loaded, tiny)


def test_wan_folder_config_json_is_used(tmp_path, tiny_sd):
    """num_heads comes from config.json (dim 96 is not inferable), text_len too (not in the weights)."""
    folder = tmp_path / "wan"
    folder.mkdir()
    cfg = TINY.replace(text_len=11)
    (folder / "config.json").write_text(wan_config_json(cfg))
    save_plain(tiny_sd, folder / "diffusion_pytorch_model.safetensors")
    assert load_dit(folder).config == cfg


def test_wan_folder_config_without_num_heads(tmp_path, tiny_sd):
    """Some config.json files carry no num_heads: inferred from dim / 128, or given by the caller."""
    folder = tmp_path / "wan"
    folder.mkdir()
    d = json.loads(wan_config_json(TINY))
    del d["num_heads"]
    (folder / "config.json").write_text(json.dumps(d))
    save_plain(tiny_sd, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="num_heads"):
        load_dit(folder)
    assert load_dit(folder, num_heads=2).config == TINY


def _write_sharded(folder: Path, sd: dict[str, torch.Tensor], cfg: DiTConfig) -> list[str]:
    folder.mkdir()
    (folder / "config.json").write_text(wan_config_json(cfg))
    keys = sorted(sd)
    names = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for name, part in zip(names, halves):
        save_plain({k: sd[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return names


def test_wan_folder_sharded(tmp_path, tiny, tiny_sd):
    folder = tmp_path / "Wan2.1-T2V-tiny-sharded"
    _write_sharded(folder, tiny_sd, TINY)
    loaded = load_dit(folder)
    assert loaded.checkpoint_layout == "folder-sharded"
    assert loaded.config == TINY
    assert_same_model(loaded, tiny)


def test_wan_folder_sharded_missing_shard(tmp_path, tiny_sd):
    folder = tmp_path / "sharded"
    names = _write_sharded(folder, tiny_sd, TINY)
    (folder / names[1]).unlink()
    with pytest.raises(CheckpointError, match="missing") as err:
        load_dit(folder)
    assert names[1] in str(err.value) and names[0] not in str(err.value)


def test_wan_folder_sharded_tensor_in_no_shard(tmp_path, tiny_sd):
    folder = tmp_path / "sharded"
    _write_sharded(folder, tiny_sd, TINY)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"]["blocks.7.ffn.0.weight"] = next(iter(d["weight_map"].values()))
    index.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"blocks\.7\.ffn\.0\.weight"):
        load_dit(folder)


def test_folder_without_weights(tmp_path):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    (folder / "config.json").write_text(wan_config_json(TINY))
    with pytest.raises(CheckpointError, match=r"expected one \.safetensors file"):
        load_dit(folder)
    for name in ("a.safetensors", "b.safetensors"):  # which one would be the DiT?
        (folder / name).write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"a\.safetensors.*b\.safetensors"):
        load_dit(folder)


def test_wan_folder_unusable_config_json(tmp_path, tiny_sd):
    folder = tmp_path / "wan"
    folder.mkdir()
    save_plain(tiny_sd, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "flf2v", "dim": 96,
                                                    "num_heads": 2}))
    with pytest.raises(CheckpointError, match="flf2v"):
        load_dit(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config"):
        load_dit(folder)


# -- 4. ComfyUI repackaged -------------------------------------------------------------------------

def test_comfyui_prefixed_fp16_loaded_as_fp32(tmp_path, tiny_sd):
    path = save_plain({k: v.half() for k, v in tiny_sd.items()}, tmp_path / "wan2.1_t2v_tiny_fp16.safetensors",
                      prefix="model.diffusion_model.")
    expected = {k: v.half().float() for k, v in tiny_sd.items()}
    ref = WanDiT(TINY).eval()
    ref.load_state_dict(expected)

    loaded = load_dit(path, dtype=torch.float32, num_heads=2, text_len=TINY.text_len)
    assert loaded.config == TINY
    assert_same_model(loaded, ref)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())

    as_stored = load_dit(path, num_heads=2)
    assert all(p.dtype == torch.float16 for p in as_stored.parameters())


def test_comfyui_bundle_takes_only_the_dit(tmp_path, tiny, tiny_sd):
    g = torch.Generator().manual_seed(5)
    bundle = {"model.diffusion_model." + k: v for k, v in tiny_sd.items()}
    bundle.update({
        "first_stage_model.encoder.conv1.weight": torch.randn(96, 3, 3, 3, 3, generator=g),
        "first_stage_model.decoder.head.2.bias": torch.randn(3, generator=g),
        "first_stage_model.blocks.0.ffn.0.weight": torch.randn(7, 7, generator=g),  # a DiT-like name, not DiT
        "cond_stage_model.transformer.shared.weight": torch.randn(10, 32, generator=g),
    })
    path = save_plain(bundle, tmp_path / "bundle.safetensors")
    loaded = load_dit(path, num_heads=2, text_len=TINY.text_len)
    assert loaded.config == TINY
    assert_same_model(loaded, tiny)


def test_comfyui_short_prefix(tmp_path, tiny, tiny_sd):
    path = save_plain(tiny_sd, tmp_path / "x.safetensors", prefix="diffusion_model.")
    assert_same_model(load_dit(path, num_heads=2, text_len=TINY.text_len), tiny)


# -- 5. CausVid / Self-Forcing training dicts --------------------------------------------------

def test_causvid_generator_taken_not_critic(tmp_path, tiny, tiny_sd):
    critic = sd_of(random_model(TINY, seed=1))
    path = tmp_path / "model.pt"
    torch.save({"generator": {"model." + k: v for k, v in tiny_sd.items()},
                "critic": {"model." + k: v for k, v in critic.items()}}, path)
    loaded = load_dit(path, num_heads=2, text_len=TINY.text_len)
    assert loaded.checkpoint_layout == "pickle[generator]"
    assert_same_model(loaded, tiny)
    assert not torch.equal(loaded.state_dict()["blocks.0.self_attn.q.weight"], critic["blocks.0.self_attn.q.weight"])


def test_causvid_ode_generator_only(tmp_path, tiny, tiny_sd):
    path = tmp_path / "ode_init.pt"
    torch.save({"generator": {"model." + k: v for k, v in tiny_sd.items()}}, path)
    assert_same_model(load_dit(path, num_heads=2, text_len=TINY.text_len), tiny)


def test_self_forcing_generator_ema_taken(tmp_path, tiny, tiny_sd):
    generator = sd_of(random_model(TINY, seed=2))
    critic = sd_of(random_model(TINY, seed=3))
    ema = {fsdp_key(k): v for k, v in tiny_sd.items()}
    assert "model._fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.self_attn.q.weight" in ema
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": {"model." + k: v for k, v in generator.items()},
                "critic": {"model." + k: v for k, v in critic.items()},
                "generator_ema": ema}, path)
    loaded = load_dit(path, num_heads=2, text_len=TINY.text_len)
    assert loaded.checkpoint_layout == "pickle[generator_ema]"
    assert_same_model(loaded, tiny)  # the EMA weights
    assert not torch.equal(loaded.state_dict()["head.head.weight"], generator["head.head.weight"])


def test_plain_state_dict_pt(tmp_path, tiny, tiny_sd):
    path = tmp_path / "plain.pth"
    torch.save({"module." + k: v for k, v in tiny_sd.items()}, path)
    loaded = load_dit(path, num_heads=2, text_len=TINY.text_len)
    assert loaded.checkpoint_layout == "pickle"
    assert_same_model(loaded, tiny)


def test_normalize_dit_keys():
    t = torch.zeros(1)
    assert list(normalize_dit_keys({"model._fsdp_wrapped_module.blocks.3._fsdp_wrapped_module.ffn.0.weight": t})) \
        == ["blocks.3.ffn.0.weight"]
    assert list(normalize_dit_keys({"model.diffusion_model.head.modulation": t,
                                    "first_stage_model.head.modulation": t})) == ["head.modulation"]
    assert list(normalize_dit_keys({"_orig_mod.blocks.0.norm3.weight": t})) == ["blocks.0.norm3.weight"]


# -- 6. LongLive: base + PEFT LoRA ---------------------------------------------------------------

def make_lora(cfg: DiTConfig, rank: int, seed: int, adapter: str = "") -> dict[str, torch.Tensor]:
    """PEFT state dict over every Linear of every block; B is random (PEFT starts it at 0)."""
    g = torch.Generator().manual_seed(seed)
    ref = WanDiT(cfg)
    sd = ref.state_dict()
    out = {}
    for i in range(cfg.num_layers):
        for lin in BLOCK_LINEARS:
            w = sd[f"blocks.{i}.{lin}.weight"]
            name = f"base_model.model.blocks.{i}.{lin}"
            out[f"{name}.lora_A{adapter}.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.1
            out[f"{name}.lora_B{adapter}.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.1
    return out


def expected_merge(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], scale: float):
    out = dict(base)
    n = 0
    for k in lora:
        if ".lora_A" not in k:
            continue
        module = k.split(".lora_A")[0].removeprefix("base_model.model.")
        A, B = lora[k], lora[k.replace("lora_A", "lora_B")]
        out[module + ".weight"] = base[module + ".weight"] + scale * (B @ A)
        n += 1
    return out, n


def write_longlive(tmp_path: Path, base_sd, lora) -> tuple[Path, Path]:
    base = tmp_path / "longlive_base.pt"
    torch.save({"generator": {"model." + k: v for k, v in base_sd.items()}}, base)
    lora_path = tmp_path / "lora.pt"
    critic = {k: torch.zeros_like(v) for k, v in lora.items()}
    torch.save({"generator_lora": lora, "critic_lora": critic}, lora_path)
    return base, lora_path


def check_merged(loaded: WanDiT, expected: dict[str, torch.Tensor], cfg: DiTConfig) -> None:
    got = loaded.state_dict()
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6, msg=lambda m: f"{k}: {m}")
    ref = WanDiT(cfg).eval()
    ref.load_state_dict(expected)
    torch.testing.assert_close(run(loaded, cfg), run(ref, cfg), rtol=1e-5, atol=1e-5)


def test_longlive_lora_merge_with_alpha(tmp_path, tiny, tiny_sd):
    lora = make_lora(TINY, rank=4, seed=7)
    base, lora_path = write_longlive(tmp_path, tiny_sd, lora)
    expected, n = expected_merge(tiny_sd, lora, scale=8 / 4)
    assert n == TINY.num_layers * len(BLOCK_LINEARS)
    loaded = load_dit(base, lora=lora_path, lora_alpha=8, num_heads=2, text_len=TINY.text_len)
    check_merged(loaded, expected, TINY)
    # the LoRA changed every targeted Linear and nothing else
    for k, v in tiny_sd.items():
        targeted = any(k == f"blocks.{i}.{lin}.weight" for i in range(TINY.num_layers) for lin in BLOCK_LINEARS)
        assert torch.equal(loaded.state_dict()[k], v) != targeted, k
    assert not torch.allclose(run(loaded, TINY), run(tiny, TINY))


def test_longlive_lora_default_alpha_is_rank(tmp_path, tiny_sd):
    lora = make_lora(TINY, rank=4, seed=8)
    base, lora_path = write_longlive(tmp_path, tiny_sd, lora)
    expected, _ = expected_merge(tiny_sd, lora, scale=1.0)
    check_merged(load_dit(base, lora=lora_path, num_heads=2, text_len=TINY.text_len), expected, TINY)


def test_lora_with_peft_adapter_names_and_adapter_config(tmp_path, tiny_sd):
    """A PEFT save folder: adapter_model.safetensors (`lora_A.default.weight`) + adapter_config.json."""
    lora = make_lora(TINY, rank=4, seed=9, adapter=".default")
    base, _ = write_longlive(tmp_path, tiny_sd, lora)
    folder = tmp_path / "peft_adapter"
    folder.mkdir()
    save_plain(lora, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 12, "peft_type": "LORA"}))
    expected, _ = expected_merge(tiny_sd, lora, scale=12 / 4)
    check_merged(load_dit(base, lora=folder, num_heads=2, text_len=TINY.text_len), expected, TINY)
    check_merged(load_dit(base, lora=folder / "adapter_model.safetensors", num_heads=2, text_len=TINY.text_len),
                 expected, TINY)
    # an explicit alpha wins over adapter_config.json
    expected2, _ = expected_merge(tiny_sd, lora, scale=8 / 4)
    check_merged(load_dit(base, lora=folder, lora_alpha=8, num_heads=2, text_len=TINY.text_len), expected2, TINY)


def test_merge_lora_function():
    W = torch.randn(6, 5)
    A, B = torch.randn(2, 5), torch.randn(6, 2)
    sd = {"blocks.0.ffn.0.weight": W.clone()}
    assert merge_lora(sd, {"base_model.model.blocks.0.ffn.0.lora_A.weight": A,
                           "base_model.model.blocks.0.ffn.0.lora_B.weight": B}, alpha=3.0) == 1
    torch.testing.assert_close(sd["blocks.0.ffn.0.weight"], W + 1.5 * B @ A)
    with pytest.raises(CheckpointError, match="lora_B"):
        merge_lora(dict(sd), {"base_model.model.blocks.0.ffn.0.lora_A.weight": A})
    with pytest.raises(CheckpointError, match="blocks.0.ffn.9"):
        merge_lora(dict(sd), {"blocks.0.ffn.9.lora_A.weight": A, "blocks.0.ffn.9.lora_B.weight": B})
    with pytest.raises(CheckpointError, match="shape"):
        merge_lora(dict(sd), {"blocks.0.ffn.0.lora_A.weight": A.T.contiguous()[:2],
                              "blocks.0.ffn.0.lora_B.weight": B})
    with pytest.raises(CheckpointError, match="no LoRA"):
        merge_lora(dict(sd), {"blocks.0.ffn.0.weight": W})
    # an `.alpha` tensor in the file (kohya-style) sets that module's scale
    sd = {"blocks.0.ffn.0.weight": W.clone()}
    merge_lora(sd, {"blocks.0.ffn.0.lora_A.weight": A, "blocks.0.ffn.0.lora_B.weight": B,
                    "blocks.0.ffn.0.alpha": torch.tensor(5.0)})
    torch.testing.assert_close(sd["blocks.0.ffn.0.weight"], W + 2.5 * B @ A)


def test_lora_file_given_as_base_is_refused(tmp_path, tiny_sd):
    _, lora_path = write_longlive(tmp_path, tiny_sd, make_lora(TINY, rank=4, seed=10))
    assert is_lora(read_checkpoint(lora_path).tensors)
    with pytest.raises(CheckpointError, match="LoRA"):
        load_dit(lora_path)


def test_full_model_given_as_lora_is_refused(tmp_path, tiny_sd):
    base, _ = write_longlive(tmp_path, tiny_sd, make_lora(TINY, rank=4, seed=11))
    with pytest.raises(CheckpointError, match="not a LoRA"):
        load_dit(base, lora=base, num_heads=2)


# -- 7. config inference from shapes -----------------------------------------------------------

def test_infer_config_from_shapes(tmp_path):
    original = random_model(WANLIKE, seed=4)
    path = save_plain(sd_of(original), tmp_path / "wanlike.safetensors")
    assert read_checkpoint(path).metadata == {}
    loaded = load_dit(path)
    assert loaded.config == WANLIKE
    assert loaded.config.num_heads == 2 and loaded.config.head_dim == 128
    assert_same_model(loaded, original)


def test_infer_config_variants():
    cfg = WANLIKE.replace(qk_norm=False, cross_attn_norm=False, num_layers=3, in_dim=20, out_dim=8,
                          freq_dim=64, patch_size=(1, 1, 2))
    sd = WanDiT(cfg).state_dict()
    assert infer_dit_config(sd) == cfg
    with pytest.raises(CheckpointError, match="not a Wan2.1 DiT"):
        infer_dit_config({k: v for k, v in sd.items() if k != "head.modulation"})


def test_dim_not_multiple_of_128_needs_num_heads(tmp_path, tiny, tiny_sd):
    path = save_plain(tiny_sd, tmp_path / "tiny_plain.safetensors")
    with pytest.raises(CheckpointError, match="num_heads") as err:
        load_dit(path)
    assert "96" in str(err.value)
    loaded = load_dit(path, num_heads=2)
    assert loaded.config == TINY.replace(text_len=512)  # text_len is not in the weights: Wan's 512
    assert_same_model(loaded, tiny, context_len=512)  # no padding: the same input on both sides


# -- 8. i2v ----------------------------------------------------------------------------------------

def test_i2v_round_trip(tmp_path):
    original = random_model(TINY_I2V, seed=6)
    assert "img_emb.proj.0.weight" in original.state_dict()
    path = tmp_path / "i2v.safetensors"
    save_dit(original, path)
    loaded = load_dit(path)
    assert loaded.config == TINY_I2V
    assert_same_model(loaded, original)

    plain = save_plain(sd_of(original), tmp_path / "i2v_plain.safetensors")
    inferred = load_dit(plain, num_heads=2, text_len=TINY_I2V.text_len)
    assert inferred.config.model_type == "i2v"
    assert inferred.config.clip_dim == TINY_I2V.clip_dim and inferred.config.in_dim == 36
    assert_same_model(inferred, original)


# -- bad files ---------------------------------------------------------------------------------

def test_truncated_safetensors(tmp_path, tiny):
    path = tmp_path / "cut.safetensors"
    save_dit(tiny, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_dit(path)


@pytest.mark.parametrize("zipfile_format", [True, False], ids=["zip", "legacy"])
def test_truncated_pt(tmp_path, tiny_sd, zipfile_format):
    path = tmp_path / "cut.pt"
    torch.save({"generator": {"model." + k: v for k, v in tiny_sd.items()}}, path,
               _use_new_zipfile_serialization=zipfile_format)
    assert load_dit(path, num_heads=2).checkpoint_layout == "pickle[generator]"
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 3):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            load_dit(path)


@pytest.mark.parametrize("zipfile_format", [True, False], ids=["zip", "legacy"])
def test_truncated_pt_anywhere_gives_checkpoint_error(tmp_path, zipfile_format):
    """Wherever a download stops, the error is a CheckpointError, never a raw IndexError / struct.error."""
    path = tmp_path / "cut.pt"
    torch.save({"generator": {"model.a": torch.randn(3, 3), "model.b": torch.randn(4)}, "step": 3}, path,
               _use_new_zipfile_serialization=zipfile_format)
    data = path.read_bytes()
    for cut in range(1, len(data), max(1, len(data) // 150)):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            read_checkpoint(path)


def test_garbage_pt(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"<!DOCTYPE html><html>404 Not Found</html>\n")  # a failed download saved as a .pt
    with pytest.raises(CheckpointError, match="not a PyTorch file"):
        load_dit(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"\bempty\b"):  # not "test_empty_file" of the tmp path
        load_dit(path)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_dit(tmp_path / "nope.safetensors")


class CustomObject:
    """A class only this module defines: unpickling it needs code."""

    def __init__(self):
        self.weights = torch.zeros(2)


class RunsCode:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_custom_class_is_refused(tmp_path, tiny_sd):
    path = tmp_path / "custom.pt"
    torch.save({"generator": {"model." + k: v for k, v in tiny_sd.items()}, "extra": CustomObject()}, path)
    with pytest.raises(CheckpointError, match="refused.*CustomObject"):  # names the class it met
        load_dit(path)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_runs_code_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    # the payload first: a pickle.dump'ed tensor would itself be refused (torch.storage._load_from_bytes)
    obj = {"payload": RunsCode(marker), "generator": {"model.blocks.0.ffn.0.weight": torch.zeros(2)}}
    if writer == "torch.save":
        torch.save(obj, path)
    else:  # protocol 2, as torch.save uses: the restricted unpickler meets the GLOBAL, not an unknown opcode
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused.*system"):
        load_dit(path)
    assert not marker.exists(), "the pickle's code ran"
    # the payload is real: an unrestricted unpickler would run it
    with open(path, "rb") as f:
        if writer == "pickle.dump":
            pickle.load(f)
            assert marker.exists()


def test_missing_keys_are_listed(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    del sd["blocks.1.ffn.2.bias"]
    path = save_ours(sd, TINY, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing keys.*blocks\.1\.ffn\.2\.bias"):
        load_dit(path)


def test_unexpected_keys_are_listed(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    sd["blocks.0.self_attn.lora_magnitude.weight"] = torch.zeros(3)
    path = save_ours(sd, TINY, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"1 unexpected keys.*blocks\.0\.self_attn\.lora_magnitude\.weight"):
        load_dit(path)


def test_shape_mismatch_is_listed(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    sd["blocks.0.ffn.0.weight"] = torch.zeros(100, 96)
    path = save_ours(sd, TINY, tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointError, match=r"shape mismatch.*blocks\.0\.ffn\.0\.weight.*\(100, 96\).*\(160, 96\)"):
        load_dit(path)


def test_not_a_wan_model(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = save_plain({"foo.weight": torch.randn(4, 4, generator=g), "bar.bias": torch.randn(4, generator=g)},
                      tmp_path / "foo.safetensors")
    with pytest.raises(CheckpointError, match="not a Wan2.1 DiT"):
        load_dit(path)
    pt = tmp_path / "foo.pt"
    torch.save({"foo.weight": torch.randn(4, 4, generator=g)}, pt)
    with pytest.raises(CheckpointError, match="not a Wan2.1 DiT"):
        load_dit(pt)


@pytest.mark.parametrize("name", ["model.gguf", "model.txt", "model"])
def test_unknown_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="unknown file type"):
        load_dit(path)


def test_training_dict_without_weights(tmp_path):
    path = tmp_path / "optimizer_only.pt"
    torch.save({"step": 1000, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]}}, path)
    with pytest.raises(CheckpointError, match="without model weights") as err:
        load_dit(path)
    assert "optimizer" in str(err.value) and "generator" in str(err.value)


def test_training_dict_with_non_tensor_weights(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"generator": {"model.blocks.0.ffn.0.weight": torch.zeros(2), "model.step": 3}}, path)
    with pytest.raises(CheckpointError, match="not tensors.*model.step"):
        load_dit(path)


def test_pt_holding_a_list(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="dict of tensors.*list"):
        load_dit(path)


# -- memory: built on the meta device, the tensors read become the parameters ----------------------

def test_load_assigns_the_tensors_read_without_init(tmp_path, tiny, monkeypatch):
    path = tmp_path / "tiny.safetensors"
    save_dit(tiny, path)
    read_ptrs: set[int] = set()
    real_read = C.read_checkpoint

    def recording_read(*a, **k):
        raw = real_read(*a, **k)
        read_ptrs.update(t.data_ptr() for t in raw.tensors.values())
        return raw

    built_on: list[str] = []

    class RecordingWanDiT(WanDiT):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built_on.append(self.patch_embedding.weight.device.type)

    monkeypatch.setattr(C, "read_checkpoint", recording_read)
    monkeypatch.setattr(model_module, "WanDiT", RecordingWanDiT)
    monkeypatch.setattr(WanDiT, "init_weights", lambda self: pytest.fail("init_weights called while loading"))
    loaded = load_dit(path)
    assert built_on == ["meta"], "the model must be built without allocating weights"
    params = dict(loaded.named_parameters())
    assert params and all(p.data_ptr() in read_ptrs for p in params.values()), \
        [k for k, p in params.items() if p.data_ptr() not in read_ptrs][:5]
    assert all(p.device.type == "cpu" for p in params.values())


MEMORY_SCRIPT = textwrap.dedent("""
    import gc, sys
    import torch
    from causvid_core.checkpoints import load_dit
    from causvid_core.model import WanDiT
    from causvid_core.config import DiTConfig

    def status(field):  # kB in /proc/self/status
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    with torch.device("meta"):
        WanDiT(DiTConfig(dim=256, ffn_dim=64, num_heads=2, num_layers=1, text_dim=32))  # warm up
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS: importing torch peaked higher
    before = status("VmRSS")
    assert status("VmHWM") < before + 8e6, "peak RSS was not reset"
    model = load_dit(sys.argv[1])
    total = sum(float(p.detach().double().sum()) for p in model.parameters())  # page every weight in (mmap is lazy)
    peak = status("VmHWM")
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    print(peak - before, n)
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_near_file_size(tmp_path):
    cfg = DiTConfig(dim=512, ffn_dim=1024, num_heads=4, num_layers=4, text_dim=64)  # ~50 MB in fp32
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    path = save_plain(sd, tmp_path / "big.safetensors")
    size = path.stat().st_size
    assert 40e6 < size < 70e6
    del sd
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, env=env,
                         timeout=120)
    if "peak RSS was not reset" in res.stderr:
        pytest.skip("this kernel does not reset VmHWM through /proc/self/clear_refs")
    assert res.returncode == 0, res.stderr
    growth, nbytes = map(int, res.stdout.split())
    assert nbytes >= 0.99 * size - 1e6
    # one copy of the weights (+ slack for the reader); building on CPU and then copying would be >= 2x
    assert growth > 0.8 * size, "the weights were not paged in: the measurement is broken"
    assert growth < 1.6 * size, f"peak RSS grew by {growth / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"


def test_save_over_the_file_the_model_was_loaded_from(tmp_path, tiny):
    """Loaded weights may be memory-mapped from the file: saving over it must replace the file (rename),
    not rewrite it in place (that would change, or with SIGBUS crash, the model still using it)."""
    path = tmp_path / "w.safetensors"
    save_dit(tiny, path)
    loaded = load_dit(path)
    other = random_model(TINY, seed=12)
    save_dit(other, path)  # e.g. a training run writing its latest state over the file
    assert_same_weights(loaded, sd_of(tiny))
    assert_same_weights(load_dit(path), sd_of(other))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_changing_loaded_weights_leaves_the_file_alone(tmp_path, tiny, tiny_sd, suffix):
    """Weights may be memory-mapped from the file: in-place training must not write through to it."""
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save({"generator": {"model." + k: v for k, v in tiny_sd.items()}}, path)
    else:
        save_dit(tiny, path)
    before = path.read_bytes()
    loaded = load_dit(path, num_heads=2, text_len=TINY.text_len)
    with torch.no_grad():
        for p in loaded.parameters():
            p.add_(1.0)
    assert path.read_bytes() == before
    assert_same_model(load_dit(path, num_heads=2, text_len=TINY.text_len), tiny)


def test_written_files_get_umask_permissions_not_owner_only(tmp_path, tiny):
    """Atomic writes go through mkstemp (owner-only); a checkpoint in a shared models folder must be readable."""
    import stat
    from trainer.run import atomic_write_text
    old = os.umask(0o022)
    try:
        save_dit(tiny, tmp_path / "m.safetensors")
        atomic_write_text(tmp_path / "DONE.json", "{}")
    finally:
        os.umask(old)
    for name in ("m.safetensors", "DONE.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_saved_files_are_byte_identical_whatever_the_metadata_order(tmp_path):
    """safetensors writes metadata in hash order, which varies between processes: republishing unchanged
    weights then made new bytes (a new blob in git). Keys come out sorted, so the bytes depend on content only."""
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    keys = [f"causvid.k{i:02d}" for i in range(12)]
    meta = {k: f"value é {i}" for i, k in enumerate(keys)}
    atomic_save_safetensors(tensors, tmp_path / "one.safetensors", meta)
    atomic_save_safetensors(tensors, tmp_path / "two.safetensors", dict(reversed(list(meta.items()))))
    one, two = (tmp_path / "one.safetensors").read_bytes(), (tmp_path / "two.safetensors").read_bytes()
    assert one == two
    n = int.from_bytes(one[:8], "little")
    assert list(json.loads(one[8:8 + n])["__metadata__"]) == sorted(keys)
    raw = read_checkpoint(tmp_path / "one.safetensors")
    assert raw.metadata == meta and torch.equal(raw.tensors["b"], tensors["b"])


def _wanlike(seed):
    """A random DiT whose config a file without metadata gives back (heads = dim / 128, text_len 512)."""
    return tiny_model(seed=seed, dim=256, num_heads=2, ffn_dim=64, num_layers=1, text_dim=32, text_len=512)


def _fp8_files(tmp_path):
    """A tiny DiT saved as an fp8 file (every weight e4m3fn) and as ComfyUI's fp8_scaled (linear weights scaled
    per row, `scaled_fp8` marker, an input scale), with what each holds in full precision."""
    from safetensors.torch import save_file

    model = _wanlike(3)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}
    save_file(fp8, str(tmp_path / "dit_fp8_e4m3fn.safetensors"))
    scaled, truth = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 2:
            scale = v.abs().amax(dim=1).clamp_min(1e-8) / 448.0
            q = (v / scale[:, None]).to(torch.float8_e4m3fn)
            scaled[k], scaled[k[:-7] + ".scale_weight"] = q, scale
            scaled[k[:-7] + ".scale_input"] = torch.ones(())
            truth[k] = q.float() * scale[:, None]
        else:
            scaled[k], truth[k] = v.to(torch.bfloat16), v.to(torch.bfloat16).float()
    save_file(scaled, str(tmp_path / "dit_fp8_scaled.safetensors"))
    return model, {k: v.float() for k, v in fp8.items()}, truth


def test_fp8_and_fp8_scaled_files_load_kept_in_fp8_or_dequantised(tmp_path):
    """fp8 weights stay fp8 in memory (half of bf16) and are cast per layer, or are dequantised; either way the
    model computes with the file's numbers (for fp8_scaled: fp8 times the per-row scale)."""
    from causvid_core.fp8 import CastLinear

    model, fp8_values, scaled_values = _fp8_files(tmp_path)
    cfg = model.config
    x, t, ctx = torch.randn(1, 16, 3, 4, 4), torch.tensor([500.0]), torch.randn(1, 5, cfg.text_dim)
    for name, values in (("dit_fp8_e4m3fn", fp8_values), ("dit_fp8_scaled", scaled_values)):
        path = tmp_path / f"{name}.safetensors"
        ref = _wanlike(3)
        ref.load_state_dict(values)
        want = ref(x, t, ctx)
        full = load_dit(path, keep_fp8=False)  # dequantised, float32
        assert all(p.dtype == torch.float32 for p in full.parameters())
        torch.testing.assert_close(full(x, t, ctx), want, atol=1e-4, rtol=1e-4)
        kept = load_dit(path, keep_fp8=True, dtype=torch.float32)  # fp8 storage, cast per layer
        q = kept.blocks[0].self_attn.q
        assert isinstance(q, CastLinear) and q.weight.dtype == torch.float8_e4m3fn and kept.compute_dtype == torch.float32
        torch.testing.assert_close(kept(x, t, ctx), want, atol=1e-4, rtol=1e-4)
    kept = load_dit(tmp_path / "dit_fp8_scaled.safetensors", keep_fp8=True)  # bf16 compute by default
    weights = sum(p.numel() * p.element_size() for p in kept.parameters())
    bf16 = sum(p.numel() * 2 for p in kept.parameters())
    assert weights < 0.75 * bf16 and kept.compute_dtype == torch.bfloat16
    assert torch.isfinite(kept(x, t, ctx)).all()


# Wan2.1 -> diffusers names, as diffusers' conversion script renames them (norm2 and norm3 swap places)
TO_DIFFUSERS = (("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
                ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
                ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
                ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
                ("time_projection.1.", "condition_embedder.time_proj."), ("head.head.", "proj_out."))
BLOCK_TO_DIFFUSERS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                      "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q",
                      "self_attn.norm_k": "attn1.norm_k", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
                      "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0",
                      "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
                      "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2", "norm3": "norm2", "modulation": "scale_shift_table"}


def test_a_diffusers_pipeline_folder_loads(tmp_path):
    """diffusers' layout (WanTransformer3DModel's names and config.json, in a pipeline's transformer/ folder)
    gives the model back."""
    import re

    model = _wanlike(7)
    sd = {}
    for k, v in model.state_dict().items():
        if k == "head.modulation":
            k = "scale_shift_table"
        for old, new in TO_DIFFUSERS:
            k = new + k[len(old):] if k.startswith(old) else k
        m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", k) or re.match(r"blocks\.(\d+)\.(modulation)()$", k)
        if m:
            k = f"blocks.{m.group(1)}.{BLOCK_TO_DIFFUSERS[m.group(2)]}" + (f".{m.group(3)}" if m.group(3) else "")
        sd[k] = v.contiguous()
    assert not any(".self_attn." in k or k.startswith("head.") for k in sd)
    folder = tmp_path / "Wan2.1-T2V-tiny-Diffusers"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    cfg = model.config
    (folder / "transformer" / "config.json").write_text(json.dumps({
        "_class_name": "WanTransformer3DModel", "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
        "in_channels": 16, "out_channels": 16, "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "patch_size": [1, 2, 2]}))
    save_file(sd, str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    loaded = load_dit(folder)
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([300.0]), torch.randn(1, 5, cfg.text_dim)
    torch.testing.assert_close(loaded(x, t, ctx), model(x, t, ctx))



def test_a_diffusers_named_lora_applies_to_wan_names(tmp_path):
    """A LoRA saved under diffusers' names (transformer.blocks.0.attn1.to_q.lora_A ...) merges into Wan's weights."""
    from causvid_core.checkpoints import merge_lora

    model = _wanlike(5)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    w = sd["blocks.0.self_attn.q.weight"]
    a, b = torch.randn(2, w.shape[1]), torch.randn(w.shape[0], 2)
    merge_lora(sd, {"transformer.blocks.0.attn1.to_q.lora_A.weight": a,
                    "transformer.blocks.0.attn1.to_q.lora_B.weight": b})
    torch.testing.assert_close(sd["blocks.0.self_attn.q.weight"], w + b @ a)
