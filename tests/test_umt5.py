"""umT5 encoder (transformers' own): the same numbers from every key layout, tokenizers,
the zero-row contract, fp8 files, and the errors users see. Everything is built locally at tiny size."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from causvid_core.checkpoints import CheckpointError
from causvid_core.umt5 import (UMT5_PRESETS, T5TextEncoder, UMT5Encoder, clean_prompt,
                               load_tokenizer, load_umt5, load_umt5_text_encoder)
from tests.conftest import assert_close

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=300, d_model=32, d_kv=6, d_ff=48, num_layers=2, num_heads=4,
            relative_attention_num_buckets=32, relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu", dropout_rate=0.0)
SENTENCES = ["a red cat runs in the park", "the dog jumps over a blue ball", "a video of a sunset over the sea",
             "two birds fly above green trees", "a small boat sails on a calm lake"] * 4


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights everywhere (norms too), so swapped or skipped tensors change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "embed" in name or "shared" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
    return model.eval()


def hf_umt5(seed: int = 0, **changes) -> torch.nn.Module:
    cfg = transformers.UMT5Config(**{**TINY, **changes}, attn_implementation="eager")
    return _randomise(transformers.UMT5EncoderModel(cfg), seed)


def hf_to_wan(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Written out by hand from wan/modules/t5.py, independently of the library's converter."""
    out = {"token_embedding.weight": sd["shared.weight"], "norm.weight": sd["encoder.final_layer_norm.weight"]}
    for i in range(num_layers):
        a, f = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        for n in "qkvo":
            out[f"blocks.{i}.attn.{n}.weight"] = sd[a + f"SelfAttention.{n}.weight"]
        out[f"blocks.{i}.pos_embedding.embedding.weight"] = sd[a + "SelfAttention.relative_attention_bias.weight"]
        out[f"blocks.{i}.norm1.weight"] = sd[a + "layer_norm.weight"]
        out[f"blocks.{i}.ffn.gate.0.weight"] = sd[f + "DenseReluDense.wi_0.weight"]
        out[f"blocks.{i}.ffn.fc1.weight"] = sd[f + "DenseReluDense.wi_1.weight"]
        out[f"blocks.{i}.ffn.fc2.weight"] = sd[f + "DenseReluDense.wo.weight"]
        out[f"blocks.{i}.norm2.weight"] = sd[f + "layer_norm.weight"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    sd.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight; save_pretrained keeps one
    return sd


def padded_batch(lengths: list[int], L: int, vocab: int = 300, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), L), generator=g)
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask  # pad id 0 past each length


def train_tokenizer_json(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(SENTENCES, trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    # like google/umt5-xxl's tokenizer.json: EOS appended by the post-processor (we must not add a second)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def train_spiece() -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=buf, vocab_size=40,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One random tiny umT5 saved as a transformers folder, a bare safetensors file and Wan's .pth."""
    tmp = tmp_path_factory.mktemp("umt5")
    torch.manual_seed(0)
    hf = hf_umt5(seed=0)
    hf.save_pretrained(tmp / "hf")
    sd = hf_state(hf)
    save_file(sd, str(tmp / "umt5_tiny.safetensors"))
    wan = hf_to_wan(sd, TINY["num_layers"])
    torch.save(wan, tmp / "models_t5_umt5-xxl-enc-bf16.pth")
    return dict(tmp=tmp, hf=hf, sd=sd, wan=wan, folder=tmp / "hf", st=tmp / "umt5_tiny.safetensors",
                pth=tmp / "models_t5_umt5-xxl-enc-bf16.pth")


# -- parity with transformers, both layouts ---------------------------------------------------------

@pytest.mark.parametrize("layout", ["folder", "safetensors", "wan_pth"])
def test_encoder_matches_transformers_with_padding_and_long_input(files, layout):
    path = {"folder": files["folder"], "safetensors": files["st"], "wan_pth": files["pth"]}[layout]
    ours = load_umt5(path)
    assert ours.config == UMT5_PRESETS["umt5-tiny"], ours.config  # inferred from shapes (dim_attn 24 != dim 32)
    assert all(not p.is_meta for p in ours.parameters())
    assert ours.token_embedding.weight.dtype == torch.float32
    ids, mask = padded_batch([150, 97, 5], 150)  # 150 > max_distance: the saturated buckets are used
    with torch.no_grad():
        expected = files["hf"](input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert got.shape == (3, 150, 32)
    assert expected.abs().mean() > 0.1  # a real signal, not a collapsed output
    assert_close(got, expected, atol=1e-5, rtol=1e-5, what=f"umT5 vs transformers ({layout})")
    with torch.no_grad():  # the mask matters: without it the padded prompts come out different
        unmasked = ours(ids, None)
    assert (unmasked[1, :97] - expected[1, :97]).abs().max() > 1e-3


def test_max_distance_comes_from_config_json(tmp_path):
    hf = hf_umt5(seed=3, relative_attention_max_distance=16)
    hf.save_pretrained(tmp_path / "hf")
    save_file(hf_state(hf), str(tmp_path / "bare.safetensors"))
    ids, mask = padded_batch([40, 33], 40)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        from_folder = load_umt5(tmp_path / "hf")
        assert from_folder.config.max_distance == 16
        assert_close(from_folder(ids, mask), expected, what="folder with config.json")
        bare = load_umt5(tmp_path / "bare.safetensors")  # no config: umT5's 128
        assert bare.config.max_distance == 128
        assert (bare(ids, mask) - expected).abs().max() > 1e-4
        assert_close(load_umt5(tmp_path / "bare.safetensors", max_distance=16)(ids, mask), expected,
                     what="bare file with max_distance override")


def test_t5_v11_shared_bias_and_full_model_keys(tmp_path):
    """T5 v1.1 (one bias, in block 0) loads as shared_pos; decoder / lm_head weights of a full model are dropped."""
    cfg = transformers.T5Config(**TINY, attn_implementation="eager")
    hf = _randomise(transformers.T5EncoderModel(cfg), seed=5)
    sd = hf_state(hf)
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in sd
    sd["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(24, 32)
    sd["lm_head.weight"] = torch.zeros(300, 32)
    save_file(sd, str(tmp_path / "t5.safetensors"))
    ours = load_umt5(tmp_path / "t5.safetensors")
    assert ours.config == UMT5_PRESETS["umt5-tiny-shared"]
    ids, mask = padded_batch([30, 12], 30)
    with torch.no_grad():
        assert_close(ours(ids, mask), hf(input_ids=ids, attention_mask=mask).last_hidden_state, what="T5 v1.1")


def test_xxl_preset_shapes_on_meta():
    with torch.device("meta"):
        m = UMT5Encoder("umt5-xxl")
    n = sum(p.numel() for p in m.parameters())
    assert 5.6e9 < n < 5.8e9, n  # umT5-XXL encoder: ~5.7B parameters
    sd = m.state_dict()
    assert sd["model.shared.weight"].shape == (256384, 4096)
    assert sd["model.encoder.block.23.layer.1.DenseReluDense.wi_0.weight"].shape == (10240, 4096)
    assert sd["model.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape == (32, 64)
    assert len(m.model.encoder.block) == 24


# -- tokenizers ---------------------------------------------------------------------------------

def test_clean_prompt_like_wan():
    assert clean_prompt("  a &amp;amp; b\n\t  c ") == "a & b c"
    assert clean_prompt("x&lt;y") == "x<y"


def test_tokenizer_json_folder(tmp_path):
    from tokenizers import Tokenizer

    folder = train_tokenizer_json(tmp_path / "tok")
    tk = load_tokenizer(folder)
    ref = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tk.eos_id == 1 and tk.pad_id == 0
    ids, mask = tk(["a red cat runs", "  the   dog &amp;amp; ball "], text_len=16)
    want0 = ref.encode("a red cat runs").ids  # the file's own post-processor appends one </s>
    want1 = ref.encode("the dog & ball").ids
    assert ids.shape == mask.shape == (2, 16)
    assert ids[0, : len(want0)].tolist() == want0 and ids[1, : len(want1)].tolist() == want1
    assert mask.sum(1).tolist() == [len(want0), len(want1)]
    assert (ids[mask == 0] == 0).all()
    # truncation keeps the EOS last, as T5TokenizerFast(truncation=True) does
    long_ids, long_mask = tk(" ".join(SENTENCES), text_len=8)
    assert long_mask.sum() == 8 and long_ids[0, -1] == 1 and (long_ids[0, :-1] != 1).all()
    assert load_tokenizer(folder / "tokenizer.json").encode("a red cat") == ref.encode("a red cat").ids[:-1]


def test_spiece_model_folder_and_bytes(tmp_path):
    import sentencepiece as spm

    proto = train_spiece()
    (tmp_path / "spiece.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    for tk in (load_tokenizer(tmp_path), load_tokenizer(proto)):
        ids, mask = tk("a small boat on the sea", text_len=32)
        want = sp.encode("a small boat on the sea") + [sp.eos_id()]
        assert ids[0, : len(want)].tolist() == want and int(mask.sum()) == len(want)


# -- the text encoder: zero rows, file resolution ------------------------------------------------------

def test_text_encoder_zeroes_rows_past_length(files, tmp_path):
    # a Wan2.1 model folder: the .pth beside google/umt5-xxl/, found without naming either
    wan_dir = tmp_path / "Wan2.1-T2V-tiny"
    wan_dir.mkdir()
    (wan_dir / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(files["pth"].read_bytes())
    train_tokenizer_json(wan_dir / "google" / "umt5-xxl")
    te = load_umt5_text_encoder(wan_dir, text_len=24)
    assert isinstance(te, T5TextEncoder) and te.text_dim == 32 and te.text_len == 24
    prompts = ["a red cat runs in the park", "", "two   birds &amp;amp; trees"]
    out = te.encode(prompts)
    ids, mask = te.tokenizer(prompts, 24)
    lengths = mask.sum(1).tolist()
    assert out.shape == (3, 24, 32) and lengths[1] == 1  # an empty prompt is one EOS, as in Wan
    with torch.no_grad():
        expected = files["hf"](input_ids=ids, attention_mask=mask).last_hidden_state  # run over all 24 positions
    for i, n in enumerate(lengths):
        assert_close(out[i, :n], expected[i, :n], what=f"prompt {i} valid rows")
        assert (out[i, n:] == 0).all(), f"prompt {i}: rows past its length {n} are not zero"
        assert (out[i, :n].abs().sum(-1) > 0).all()
    # alone it runs over fewer positions; equal up to summation order. A str is accepted.
    assert_close(te(prompts[0])[0], out[0], what="prompt alone vs in a batch")


def test_diffusers_folder_finds_text_encoder_and_tokenizer(files, tmp_path):
    files["hf"].save_pretrained(tmp_path / "Wan2.1-T2V-1.3B-Diffusers" / "text_encoder")
    train_tokenizer_json(tmp_path / "Wan2.1-T2V-1.3B-Diffusers" / "tokenizer")
    te = load_umt5_text_encoder(tmp_path / "Wan2.1-T2V-1.3B-Diffusers", text_len=12)
    ids, mask = te.tokenizer("a blue ball", 12)
    n = int(mask.sum())
    with torch.no_grad():
        expected = files["hf"](input_ids=ids, attention_mask=mask).last_hidden_state
    out = te.encode(["a blue ball"])
    assert_close(out[0, :n], expected[0, :n], what="diffusers folder")
    assert (out[0, n:] == 0).all()


def test_comfy_file_with_embedded_spiece_model(files, tmp_path):
    proto = train_spiece()
    sd = dict(files["sd"])
    sd["spiece_model"] = torch.frombuffer(bytearray(proto), dtype=torch.uint8)
    save_file(sd, str(tmp_path / "umt5_xxl_fp16.safetensors"))
    te = load_umt5_text_encoder(tmp_path / "umt5_xxl_fp16.safetensors", text_len=16)
    import sentencepiece as spm

    want = spm.SentencePieceProcessor(model_proto=proto).encode("a calm lake") + [1]
    ids, _ = te.tokenizer("a calm lake", 16)
    assert ids[0, : len(want)].tolist() == want
    assert te.encode("a calm lake").shape == (1, 16, 32)


# -- fp8 files ----------------------------------------------------------------------------------

def _scaled_fp8(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ComfyUI's scaled-fp8 layout: fp8 linear weights, fp32 `scale_weight` / `scale_input`, a `scaled_fp8` marker."""
    out, dequant = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in sd.items():
        if v.dim() == 2 and "DenseReluDense" in k or k.endswith(("q.weight", "k.weight", "v.weight", "o.weight")):
            scale = v.abs().max() / 448.0
            q = (v / scale).to(torch.float8_e4m3fn)
            out[k], out[k[:-6] + "scale_weight"] = q, scale.reshape(())
            out[k[:-6] + "scale_input"] = torch.ones(())
            dequant[k] = q.float() * scale
        else:
            out[k] = v
    return out, dequant


def test_scaled_fp8_file_is_dequantised(files, tmp_path):
    sd8, dequant = _scaled_fp8(files["sd"])
    save_file(sd8, str(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
    m = load_umt5(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", dtype=torch.float32)
    assert m.checkpoint_layout.endswith("+fp8")
    got = m.state_dict()
    o = "model.encoder.block.0.layer.0.SelfAttention.o.weight"
    assert torch.equal(got["model.encoder.block.1.layer.1.DenseReluDense.wi_0.weight"],
                       dequant["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"])
    assert torch.equal(got[o], dequant["encoder.block.0.layer.0.SelfAttention.o.weight"])
    assert not torch.equal(got[o], files["wan"]["blocks.0.attn.o.weight"])  # fp8 rounding
    ids, mask = padded_batch([20, 9], 20)
    with torch.no_grad():
        rel = (m(ids, mask) - files["hf"](input_ids=ids, attention_mask=mask).last_hidden_state).norm()
    assert rel / files["hf"](input_ids=ids, attention_mask=mask).last_hidden_state.norm() < 0.1
    assert load_umt5(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors").token_embedding.weight.dtype == torch.bfloat16


def test_unsupported_quantisation_is_a_clear_error(files, tmp_path):
    sd = dict(files["sd"])
    sd["encoder.block.0.layer.0.SelfAttention.q.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'),
                                                                              dtype=torch.uint8)
    save_file(sd, str(tmp_path / "q.safetensors"))
    with pytest.raises(CheckpointError, match="comfy_quant.*not supported"):
        load_umt5(tmp_path / "q.safetensors")
    sd = dict(files["sd"])
    sd["encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(24, 32, dtype=torch.int8)
    save_file(sd, str(tmp_path / "int8.safetensors"))
    with pytest.raises(CheckpointError, match="int8"):
        load_umt5(tmp_path / "int8.safetensors")


# -- errors --------------------------------------------------------------------------------------

def test_missing_files_name_what_to_download(files, tmp_path):
    for weights in (tmp_path / "nope.pth", None):
        with pytest.raises(CheckpointError) as e:
            load_umt5_text_encoder(weights)
        msg = str(e.value)
        for needed in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan-AI/Wan2.1-T2V-1.3B", "umt5_xxl_fp16.safetensors",
                       "models/text_encoders", "google/umt5-xxl"):
            assert needed in msg, (needed, msg)
    with pytest.raises(CheckpointError, match="umT5 weights not found"):
        load_umt5(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="tokenizer not found.*google/umt5-xxl"):  # weights, no tokenizer
        load_umt5_text_encoder(files["st"])
    with pytest.raises(CheckpointError, match="tokenizer not found"):
        load_umt5_text_encoder(files["st"], tmp_path / "no_tokenizer_here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no umT5 tokenizer here.*tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def test_corrupt_files_raise_checkpoint_error(files, tmp_path):
    for src, name in ((files["pth"], "cut.pth"), (files["st"], "cut.safetensors")):
        data = src.read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError):
            load_umt5(tmp_path / name)
    (tmp_path / "bad_tok").mkdir()
    (tmp_path / "bad_tok" / "tokenizer.json").write_text('{"model": {"type": "Unigram", "vocab": [')
    with pytest.raises(CheckpointError, match="not a readable tokenizer"):
        load_tokenizer(tmp_path / "bad_tok")
    (tmp_path / "bad_sp").mkdir()
    (tmp_path / "bad_sp" / "spiece.model").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable tokenizer"):
        load_tokenizer(tmp_path / "bad_sp")
    with pytest.raises(CheckpointError, match="not a readable tokenizer"):
        load_tokenizer(b"\x00garbage" * 10)


def test_missing_and_unexpected_keys_are_listed(files, tmp_path):
    sd = dict(files["wan"])
    del sd["blocks.1.ffn.fc2.weight"]
    sd["blocks.0.attn.extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_umt5(tmp_path / "bad.pth")
    assert "blocks.1.ffn.fc2.weight" in str(e.value) and "blocks.0.attn.extra.weight" in str(e.value)
    assert "missing" in str(e.value) and "unexpected" in str(e.value)
    save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4, 4)}, str(tmp_path / "clip.safetensors"))
    with pytest.raises(CheckpointError, match="not a umT5 encoder"):
        load_umt5(tmp_path / "clip.safetensors")
    t5v10 = dict(files["sd"])
    ffn = "encoder.block.0.layer.1.DenseReluDense."
    t5v10[ffn + "wi.weight"] = t5v10.pop(ffn + "wi_0.weight")
    save_file(t5v10, str(tmp_path / "t5v10.safetensors"))
    with pytest.raises(CheckpointError, match="T5 v1.0"):
        load_umt5(tmp_path / "t5v10.safetensors")
    cfg_file = files["folder"] / "config.json"
    cfg = json.loads(cfg_file.read_text())
    relu_dir = tmp_path / "relu"
    relu_dir.mkdir()
    (relu_dir / "model.safetensors").write_bytes((files["folder"] / "model.safetensors").read_bytes())
    (relu_dir / "config.json").write_text(json.dumps({**cfg, "dense_act_fn": "relu"}))
    with pytest.raises(CheckpointError, match="gated GELU-tanh"):
        load_umt5(relu_dir)


def test_bf16_run_stays_close_to_fp32(files):
    """The dtype Wan runs in: norms and softmax in fp32 keep bf16 within bf16 rounding of fp32."""
    m32, m16 = load_umt5(files["pth"]), load_umt5(files["pth"], dtype=torch.bfloat16)
    assert m16.model.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.bfloat16
    ids, mask = padded_batch([30, 10], 30)
    with torch.no_grad():
        a, b = m32(ids, mask), m16(ids, mask).float()
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a - b).norm() / a.norm() < 0.05
    assert not math.isclose(float((a - b).abs().max()), 0.0)
