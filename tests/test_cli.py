"""The `causvid` command end to end on tiny saved models: generate (single, schedule, batch, image,
video), stream, info, and errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from causvid_core.checkpoints import save_dit
from causvid_core.text import WordEncoderConfig, WordTextEncoder, save_text_encoder
from causvid_core.vae import random_vae, save_vae
from causvid_core.video_io import read_video, write_mp4
from conftest import tiny_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    save_dit(tiny_model(), d / "dit.safetensors")
    save_vae(random_vae("wan-tiny"), d / "vae.safetensors")
    save_text_encoder(WordTextEncoder(WordEncoderConfig(text_dim=24, text_len=8)).eval(), d / "text.safetensors")
    return ["--model", str(d / "dit.safetensors"), "--vae", str(d / "vae.safetensors"),
            "--text-encoder", str(d / "text.safetensors")]


def causvid(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "causvid_core.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_generate_writes_an_mp4_of_the_requested_length(files, tmp_path):
    out = tmp_path / "a.mp4"
    r = causvid("generate", *files, "--prompt", "a red circle", "--frames", 17, "--width", 48, "--height", 32,
                "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    video = read_video(out)
    assert video.shape == (17, 32, 48, 3)
    assert not list(tmp_path.glob("*.part"))


def test_generate_with_a_schedule_batch_image_and_video(files, tmp_path):
    sched = tmp_path / "s.txt"
    sched.write_text("0: a red circle\n10: a blue square\n")
    r = causvid("generate", *files, "--schedule", sched, "--switch-mode", "recache", "--frames", 33,
                "--width", 32, "--height", 32, "--out", tmp_path / "s.mp4", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "frame 10 snapped to frame 9" in r.stderr
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n\na green square\nzebra\n")
    r = causvid("generate", *files, "--prompts", prompts, "--out-dir", tmp_path / "batch", "--frames", 9,
                "--width", 32, "--height", 32, "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "batch").iterdir()) == ["000.mp4", "001.mp4", "002.mp4"]
    from PIL import Image
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "i.png")
    r = causvid("generate", *files, "--prompt", "x", "--image", tmp_path / "i.png", "--frames", 9,
                "--out", tmp_path / "i.mp4", "--quiet")
    assert r.returncode == 0, r.stderr
    assert read_video(tmp_path / "i.mp4").shape == (9, 32, 32, 3)
    write_mp4(tmp_path / "in.mp4", np.random.default_rng(0).integers(0, 255, (13, 32, 48, 3), dtype=np.uint8))
    r = causvid("generate", *files, "--prompt", "x", "--video", tmp_path / "in.mp4", "--strength", 0.5,
                "--out", tmp_path / "v.mp4", "--quiet")
    assert r.returncode == 0, r.stderr
    assert read_video(tmp_path / "v.mp4").shape == (13, 32, 48, 3)


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x", "--frames", 30], "4k+1"),
    (["--prompt", "x", "--width", 40], "multiples of 16"),
    (["--frames", 9], "give --prompt"),
    (["--prompt", "x", "--steps", "fast"], "--steps takes a preset"),
])
def test_generate_errors_say_what_to_do(files, tmp_path, args, message):
    r = causvid("generate", *files, *args, "--out", tmp_path / "x.mp4", "--quiet")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_generate_without_a_model_names_the_missing_file(tmp_path):
    """An install without the built-in files (a partial checkout): the CLI points at --model. The built-in
    folder is swapped for an empty one inside the CLI's own process."""
    empty = tmp_path / "no_builtin"
    empty.mkdir()
    code = ("import sys; from pathlib import Path; from causvid_core import pipeline, cli; "
            f"pipeline.BUILTIN_DIR = Path({str(empty)!r}); sys.exit(cli.main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "generate", "--prompt", "x", "--out", str(tmp_path / "x.mp4")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "--model" in r.stderr, r.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_stream_writes_segments_and_reports_latency(files, tmp_path):
    r = causvid("stream", *files, "--prompt", "a red circle", "--width", 32, "--height", 32,
                "--out-dir", tmp_path / "st", "--seconds", 2, "--window", 6, "--sinks", 3)
    assert r.returncode == 0, r.stderr
    segs = sorted((tmp_path / "st").glob("chunk_*.mp4"))
    assert len(segs) == 3 and [len(read_video(s)) for s in segs] == [9, 12, 12]
    assert r.stdout.count(" ms (") == 3


def test_info_recognises_a_checkpoint(files):
    r = causvid("info", files[1], "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["layout"] == "safetensors" and info["config"]["dim"] == 64 and info["params"] > 0


def test_a_non_builtin_text_encoder_is_read_as_umt5(files, tmp_path):
    # a file that is not our word encoder goes to the umT5 loader, whose errors say what is wrong
    torch.save({"token_embedding.weight": torch.zeros(4, 4)}, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    args = list(files)
    i = args.index("--text-encoder") + 1
    args[i] = str(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    r = causvid("generate", *args, "--prompt", "x", "--out", tmp_path / "x.mp4", "--quiet")
    assert r.returncode == 2 and "umt5 config" in r.stderr.lower(), r.stderr
    args[i] = str(tmp_path / "missing_folder")
    r = causvid("generate", *args, "--prompt", "x", "--out", tmp_path / "x.mp4", "--quiet")
    assert r.returncode == 2 and "download" in r.stderr and "umt5" in r.stderr.lower(), r.stderr
