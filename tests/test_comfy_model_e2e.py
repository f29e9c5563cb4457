"""ComfyUI's own Wan MODEL drives the causal stream, in a real ComfyUI 0.3.75 (tests/comfy_host.py).

A tiny Wan 2.1 DiT is written in the layout ComfyUI's loaders read (Wan's key names; head_dim 128 and
text_dim 4096, as ComfyUI's model detection assumes), with a word text encoder of text_dim 4096 and a VAE beside
it (an exported checkpoint LoadCausalModel reads) and a tiny Wan VAE for ComfyUI's VAELoader. Each graph
makes the same stream twice, once through LoadCausalModel and once through UNETLoader -> (LoraLoaderModelOnly)
-> CausalModelFromComfy, and saves both LATENTs with ComfyUI's SaveLatent; they must agree:
- float32 weights: the same numbers (ComfyUI's layers run our causal forward);
- a LoRA applied by ComfyUI, and by LoadCausalModel's lora_name, = the LoRA merged into the file by this test;
- UNETLoader's fp8_e4m3fn storage = the weights rounded through fp8 in the file, cast per layer by ComfyUI.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from causvid_core.checkpoints import save_dit
from causvid_core.text import WordEncoderConfig, WordTextEncoder, save_text_encoder
from causvid_core.vae import random_vae, save_vae
from causvid_core.vae_config import VAEConfig
from comfy_host import ComfyHost, comfy_server, errors_of  # noqa: F401 (fixture)
from conftest import tiny_model

PROMPT = "a red circle moving right on a black background"
LORA_RANK, LORA_ALPHA = 4, 2.0
LORA_LAYERS = ("blocks.0.self_attn.q", "blocks.1.ffn.0", "blocks.1.cross_attn.o")


def _dit():
    # ComfyUI infers num_heads = dim // 128, text_dim 4096 (its default), freq_dim 256, cross_attn_norm
    return tiny_model(seed=11, dim=128, num_heads=1, ffn_dim=256, num_layers=2, text_dim=4096, text_len=512)


def _export(folder, dit, text, vae):
    folder.mkdir(parents=True, exist_ok=True)
    save_dit(dit, folder / "wan_tiny.safetensors")
    save_text_encoder(text, folder / "text.safetensors")
    save_vae(vae, folder / "vae.safetensors")


def _write_models(root):
    """The tiny Wan files of this module's graphs into a ComfyUI tree's models/ folder."""
    models = root / "models"
    torch.manual_seed(0)
    dit = _dit()
    text = WordTextEncoder(WordEncoderConfig(text_dim=4096, text_len=8)).eval()
    vae = random_vae(VAEConfig(dim=8, num_res_blocks=2), seed=1)  # ComfyUI's Wan 2.1 VAE has 2 res blocks
    (models / "vae").mkdir(exist_ok=True)
    save_vae(vae, models / "vae" / "tiny_wan_vae.safetensors")
    base = models / "diffusion_models"
    _export(base / "wan_tiny", dit, text, vae)

    # a LoRA in ComfyUI's layout, and the same merged into the weights
    g = torch.Generator().manual_seed(5)
    lora, merged = {}, {k: v.clone() for k, v in dit.state_dict().items()}
    for layer in LORA_LAYERS:
        w = merged[f"{layer}.weight"]
        up, down = torch.randn(w.shape[0], LORA_RANK, generator=g) * 0.05, torch.randn(LORA_RANK, w.shape[1], generator=g)
        lora.update({f"diffusion_model.{layer}.lora_up.weight": up, f"diffusion_model.{layer}.lora_down.weight": down,
                     f"diffusion_model.{layer}.alpha": torch.tensor(LORA_ALPHA)})
        merged[f"{layer}.weight"] = w + (LORA_ALPHA / LORA_RANK) * up @ down
    (models / "loras").mkdir(exist_ok=True)
    save_file(lora, str(models / "loras" / "tiny_wan_lora.safetensors"))
    with_lora = _dit()
    with_lora.load_state_dict(merged)
    _export(base / "wan_tiny_lora", with_lora, text, vae)

    # what fp8_e4m3fn storage keeps: every weight but the patch embedding (ComfyUI keeps it in float32)
    rounded = _dit()
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if not name.startswith("patch_embedding"):
                p.copy_(p.to(torch.float8_e4m3fn).float())
    _export(base / "wan_tiny_fp8", rounded, text, vae)


@pytest.fixture(scope="module")
def host(comfy_server):
    _write_models(comfy_server.root)
    yield comfy_server
    for name in ("wan_tiny", "wan_tiny_lora", "wan_tiny_fp8"):
        shutil.rmtree(comfy_server.root / "models" / "diffusion_models" / name, ignore_errors=True)


def _graph(ours: str, unet: str, weight_dtype: str = "default", lora: bool = False) -> dict:
    """Node 1..6: the stream through LoadCausalModel(ours); 20..22: through UNETLoader(unet) and the adapter;
    with lora, also 30..32: LoadCausalModel(unet) with the LoRA file applied as it loads."""
    g = {
        "1": {"class_type": "LoadCausalModel", "inputs": {"model_name": ours, "dtype": "float32", "frames_per_chunk": 0,
                                                          "window_frames": 0, "sink_frames": 0, "preset": "self-forcing"}},
        "9": {"class_type": "LoadCausalModel", "inputs": {"model_name": unet, "dtype": "float32", "frames_per_chunk": 0,
                                                          "window_frames": 0, "sink_frames": 0, "preset": "self-forcing",
                                                          "lora_name": "tiny_wan_lora.safetensors",
                                                          "lora_strength": 1.0}},
        "2": {"class_type": "CausalTextEncode", "inputs": {"model": ["1", 0], "text": PROMPT}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_wan_vae.safetensors"}},
        "10": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": weight_dtype}},
        "11": {"class_type": "CausalModelFromComfy", "inputs": {"model": ["12" if lora else "10", 0],
                                                                "preset": "self-forcing", "frames_per_chunk": 0,
                                                                "window_frames": 0, "sink_frames": 0}},
    }
    if lora:
        g["12"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["10", 0],
                                                                   "lora_name": "tiny_wan_lora.safetensors",
                                                                   "strength_model": 1.0}}
    if not lora:
        del g["9"]
    for prefix, model in (("a", "1"), ("b", "11")) + ((("c", "9"),) if lora else ()):
        n = {"a": 4, "b": 20, "c": 30}[prefix]
        g[str(n)] = {"class_type": "CausalKVState", "inputs": {"model": [model, 0], "width": 32, "height": 32,
                                                               "length": 21, "seed": 3, "vae": ["3", 0]}}
        g[str(n + 1)] = {"class_type": "StreamChunkSampler", "inputs": {"state": [str(n), 0], "chunks": 2,
                                                                         "steps": "model default",
                                                                         "conditioning": ["2", 0]}}
        g[str(n + 2)] = {"class_type": "SaveLatent", "inputs": {"samples": [str(n + 1), 1],
                                                                "filename_prefix": f"cmp/{unet.split('/')[0]}_{weight_dtype}_{lora}_{prefix}"}}
    return g


def _latents(host, entry: dict, node: str) -> torch.Tensor:
    (item,) = entry["outputs"][node]["latents"]
    return load_file(str(host.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]


@pytest.mark.parametrize("case", ["float32", "lora", "fp8"])
def test_comfyuis_model_gives_the_stream_of_the_same_weights(host, case):
    ours = {"float32": "wan_tiny", "lora": "wan_tiny_lora", "fp8": "wan_tiny_fp8"}[case]
    api = _graph(f"{ours}/wan_tiny.safetensors", "wan_tiny/wan_tiny.safetensors",
                 weight_dtype="fp8_e4m3fn" if case == "fp8" else "default", lora=case == "lora")
    status, body = host.post_prompt(api)
    assert status == 200, body
    entry = host.wait_history(body["prompt_id"], timeout=600)
    assert entry["status"]["status_str"] == "success", (errors_of(entry), host.log_tail(40))
    a, b = _latents(host, entry, "6"), _latents(host, entry, "22")
    assert a.shape == b.shape == (1, 16, 6, 4, 4)
    rel = float((a - b).norm() / a.norm())
    assert rel < 1e-4, f"{case}: the stream through ComfyUI's MODEL differs from ours by {rel:.2e} relative"
    if case == "lora":  # LoadCausalModel's own lora_name input (ComfyUI's LoRA layout) gives the merged weights too
        c = _latents(host, entry, "32")
        assert float((a - c).norm() / a.norm()) < 1e-4
    if case != "float32":  # and the change (LoRA, fp8 rounding) is not lost: far from the plain weights
        plain = host.wait_history(host.post_prompt(_graph("wan_tiny/wan_tiny.safetensors",
                                                          "wan_tiny/wan_tiny.safetensors"))[1]["prompt_id"])
        base = _latents(host, plain, "6")
        assert float((b - base).norm() / base.norm()) > 100 * rel, f"{case} made no difference"


def test_latent_previews_of_comfyuis_previewer_between_decoded_chunks(tmp_path):
    """ComfyUI started with --preview-method latent2rgb: every denoising step of a stream in the Wan VAE's latent
    space sends a preview (ComfyUI's Latent2RGB of that step's x0) to the client, besides each decoded chunk's."""
    import uuid

    with ComfyHost.start(tmp_path, extra_args=("--preview-method", "latent2rgb")) as preview_host:
        _write_models(preview_host.root)
        api = _graph("wan_tiny/wan_tiny.safetensors", "wan_tiny/wan_tiny.safetensors")
        client = uuid.uuid4().hex
        with preview_host.listen(client) as ws:
            entry = preview_host.wait_history(preview_host.queue(api, client), timeout=600)
            assert entry["status"]["status_str"] == "success", errors_of(entry)
            previews = [m for m in ws.messages if isinstance(m, tuple) and m[1] in (1, 4)]  # PREVIEW_IMAGE (+meta)
    steps, chunks, samplers = 4, 2, 2
    assert len(previews) >= samplers * chunks * (steps + 1), len(previews)  # each step's x0 and each chunk
