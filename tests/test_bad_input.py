"""Bad input never gives a silent wrong result, a traceback or a clobbered file.

Each case runs through the real CLIs (`causvid`, `causvid-train`) or node functions and must end in a non-zero
exit (2: the input is wrong; 1: the run failed) or a node error, with one line on stderr that names the input,
no traceback, and the destination untouched."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from causvid_core.cli import main as causvid
from conftest import ROOT
from trainer.cli import main as causvid_train

PROMPT = "a red circle moving right on a black background"


def run(capsys, fn, *argv) -> tuple[int, str]:
    """(exit code, stderr) of a CLI called in-process; argparse's own exits count as exit codes."""
    try:
        code = fn(list(map(str, argv)))
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    return code, err


def assert_refused(code: int, err: str, names: str, expect: int = 2) -> None:
    lines = [l for l in err.strip().splitlines() if l.strip() and "%|" not in l]  # progress bars aside
    assert code == expect, (code, err)
    assert "Traceback" not in err, err
    assert lines and names in lines[-1], f"the error does not name {names!r}: {err!r}"
    assert len(lines[-1]) < 400, lines[-1]


@pytest.fixture
def files(tmp_path):
    f = tmp_path
    Image.fromarray(np.zeros((4000, 4000, 3), np.uint8)).save(f / "huge.png")
    (f / "notimg.png").write_bytes(b"hello, not a picture")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(f / "ok.png")
    (f / "trunc.png").write_bytes((f / "ok.png").read_bytes()[:60])
    (f / "noframes.mp4").write_bytes(b"\x00" * 100)
    (f / "latin1.txt").write_bytes("0: a red circl\xe9 moving right\n".encode("latin-1"))
    (f / "bom.txt").write_bytes(f"\ufeff0: {PROMPT}\n".encode("utf-8"))
    (f / "past.txt").write_text(f"0: {PROMPT}\n500: a blue circle moving right on a black background\n")
    (f / "empty.txt").write_text("\n  \n")
    (f / "keep.mp4").write_bytes(b"precious")
    return f


GENERATE_CASES = {  # options -> what the one-line error must name
    "steps 0": (["--steps", "0"], "--steps"),
    "steps nan,inf": (["--steps", "nan,inf"], "--steps"),
    "steps not decreasing": (["--steps", "500,750"], "--steps"),
    "shift 0": (["--shift", "0"], "--shift"),
    "shift nan": (["--shift", "nan"], "--shift"),
    "width 0": (["--width", "0"], "width"),
    "width 100000": (["--width", "100000"], "--allow-large"),
    "height not a multiple": (["--height", "70"], "multiple"),
    "frames 32": (["--frames", "32"], "4k+1"),
    "strength 2": (["--strength", "2"], "--strength"),
    "image 4000x4000": (["--image", "{f}/huge.png"], "--allow-large"),
    "image not an image": (["--image", "{f}/notimg.png"], "--image"),
    "image truncated": (["--image", "{f}/trunc.png"], "--image"),
    "image missing": (["--image", "{f}/nope.png"], "--image"),
    "video with no frames": (["--video", "{f}/noframes.mp4"], "--video"),
    "schedule not UTF-8": (["--schedule", "{f}/latin1.txt"], "line 1"),
    "schedule past the end": (["--schedule", "{f}/past.txt"], "past the end"),
    "model missing": (["--model", "{f}/nope.safetensors"], "nope.safetensors"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_causvid_generate_refuses(capsys, files, case, monkeypatch):
    # the memory bound is judged against a 24 GiB machine, whatever machine runs the test
    monkeypatch.setattr("causvid_core.validate.physical_memory", lambda: 24 * 2 ** 30)
    opts, names = GENERATE_CASES[case]
    opts = [o.format(f=files) for o in opts]
    prompt = [] if "--schedule" in opts else ["--prompt", PROMPT]
    code, err = run(capsys, causvid, "generate", *prompt, *opts, "--out", files / "keep.mp4", "--quiet")
    assert_refused(code, err, names)
    assert (files / "keep.mp4").read_bytes() == b"precious"  # nothing replaced


@pytest.mark.parametrize("out, names", [("{f}", "folder"), ("/dev/null", "not a regular file"),
                                        ("{f}/keep.mp4/x.mp4", "not a folder")])
def test_outputs_that_are_not_files_are_refused_before_any_work(capsys, files, out, names):
    t0 = time.perf_counter()
    code, err = run(capsys, causvid, "generate", "--prompt", PROMPT, "--out", out.format(f=files), "--quiet")
    assert_refused(code, err, names)
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")  # the device is still a device
    assert time.perf_counter() - t0 < 60  # refused up front (no model was run): a bound, not a timing claim


def test_batch_prompts_empty_and_encodings(capsys, files):
    code, err = run(capsys, causvid, "generate", "--prompts", files / "empty.txt", "--out-dir", files / "batch")
    assert_refused(code, err, "no prompts")
    assert not (files / "batch").exists() or not any((files / "batch").iterdir())
    # a BOM-prefixed schedule is fine
    code, err = run(capsys, causvid, "generate", "--schedule", files / "bom.txt", "--out", files / "bom.mp4", "--quiet")
    assert code == 0 and (files / "bom.mp4").stat().st_size > 0, err


def test_unknown_words_and_empty_prompts_are_named(capsys, files):
    code, err = run(capsys, causvid, "generate", "--prompt", "a purple dragon flying", "--out", files / "w.mp4",
                    "--quiet")
    assert code == 0 and "'purple', 'dragon', 'flying'" in err and "dropped" in err
    code, err = run(capsys, causvid, "generate", "--prompt", "", "--out", files / "e.mp4", "--quiet")
    assert code == 0 and "empty prompt" in err


def test_nan_weights_stop_the_stream_and_write_nothing(capsys, files):
    from causvid_core.checkpoints import save_dit
    from causvid_core.pipeline import BUILTIN_DIR, load_components

    comps = load_components()
    with torch.no_grad():
        comps.model.blocks[0].self_attn.q.weight[0, 0] = float("nan")
    folder = files / "damaged"
    folder.mkdir()
    save_dit(comps.model, folder / "student.safetensors")
    for name in ("vae.safetensors", "text.safetensors"):
        (folder / name).write_bytes((Path(BUILTIN_DIR) / name).read_bytes())
    code, err = run(capsys, causvid, "generate", "--model", folder / "student.safetensors", "--prompt", PROMPT,
                    "--out", files / "nan.mp4", "--quiet")
    assert_refused(code, err, "NaN", expect=1)
    assert "weights" in err and not (files / "nan.mp4").exists() and not (files / "nan.mp4.part").exists()


def test_ctrl_c_during_generate_is_one_line_and_keeps_no_partial_file(files):
    out = files / "long.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "causvid_core.cli", "generate", "--prompt", PROMPT, "--frames",
                             "2001", "--window", "9", "--out", str(out)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (files / "long.mp4.part").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)  # the video is being written
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err.strip().splitlines()[-1]
    assert not out.exists() and not (files / "long.mp4.part").exists()


# -- causvid-train -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, names", [("text.steps=-5", "text.steps"), ("dmd.steps=abc", "dmd.steps"),
                                             ("dmd.steps=true", "dmd.steps"),
                                             ("teacher.lr=nan", "teacher.lr"), ("dmd.batch=0", "dmd.batch"),
                                             ("nosuch.steps=1", "nosuch")])
def test_training_settings_are_refused_before_a_run_folder_is_made(capsys, tmp_path, override, names):
    code, err = run(capsys, causvid_train, "pipeline", "--preset", "micro", "--out", tmp_path / "run", "--set", override)
    assert_refused(code, err, names)
    assert not (tmp_path / "run").exists()


def test_damaged_run_state_names_the_file_and_what_to_delete(capsys, tmp_path):
    """A finished stage whose output was truncated is not skipped; a truncated DONE.json or state.pt names
    itself and what to delete."""
    run_dir = tmp_path / "run"
    code, err = run(capsys, causvid_train, "text", "--preset", "micro", "--out", run_dir)
    assert code == 0, err
    done = json.loads((run_dir / "text" / "DONE.json").read_text())
    assert done["files"]["text.safetensors"]["size"] > 0 and len(done["files"]["text.safetensors"]["sha256"]) == 64
    out = run_dir / "text" / "text.safetensors"
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    code, err = run(capsys, causvid_train, "text", "--preset", "micro", "--out", run_dir)
    assert_refused(code, err, "text.safetensors", expect=1)
    assert "delete" in err
    out.write_bytes(data)
    (run_dir / "text" / "DONE.json").write_text('{"stage": "te')
    code, err = run(capsys, causvid_train, "text", "--preset", "micro", "--out", run_dir)
    assert_refused(code, err, "DONE.json", expect=1)

    # a checkpoint cut short by a crash while the disk was full
    (run_dir / "text" / "DONE.json").unlink()
    (run_dir / "text" / "state.pt").write_bytes(b"PK\x03\x04 half a zip")
    code, err = run(capsys, causvid_train, "text", "--preset", "micro", "--out", run_dir)
    assert_refused(code, err, "state.pt", expect=1)
    assert "delete it" in err


# -- nodes -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    from comfy_stubs import Host, stubbed_pack

    base = tmp_path_factory.mktemp("host")
    host = Host(base / "models", base / "output", torch.device("cpu"))
    with stubbed_pack(host) as module:
        yield module, host


def _builtin(pack):
    m, _ = pack
    model = m.NODE_CLASS_MAPPINGS["LoadCausalModel"]().load("built-in: Shapes World (CPU)", "auto", 0, 0, 0)[0]
    cond = m.NODE_CLASS_MAPPINGS["CausalTextEncode"]().encode(model, PROMPT)[0]
    return m, model, cond


def test_nodes_refuse_empty_and_non_finite_inputs(pack):
    m, model, cond = _builtin(pack)
    nodes = m.NODE_CLASS_MAPPINGS
    empty = torch.zeros(0, 64, 64, 3)
    state = nodes["CausalKVState"]().create(model, 64, 64, 33, 0)[0]
    for call, why in (
        (lambda: nodes["VideoToVideoStream"]().restyle(model, cond, 0.6, 0, "model default", images=empty), "empty"),
        (lambda: nodes["CausalImageToVideo"]().seed_image(state, empty), "empty"),
        (lambda: nodes["SaveCausalVideo"]().save(empty, 16, "x"), "empty"),
        (lambda: nodes["CausalImageToVideo"]().seed_image(state, torch.full((1, 64, 64, 3), float("nan"))), "NaN"),
        (lambda: nodes["StreamChunkSampler"]().sample(state, 1, "model default",
                                                     conditioning=[[torch.full_like(cond[0][0], float("nan")), {}]]),
         "NaN"),
    ):
        with pytest.raises(ValueError, match=why):
            call()


def test_text_encode_node_shows_the_dropped_words(pack):
    m, model, _ = _builtin(pack)
    out = m.NODE_CLASS_MAPPINGS["CausalTextEncode"]().encode(model, "a purple dragon")
    (warning,) = out["ui"]["causvid_warnings"]
    assert "'purple', 'dragon'" in warning and out["result"][0][0][0].shape[-1] == model.model.config.text_dim


def test_a_stage_checks_the_earlier_output_it_reads(capsys, tmp_path):
    """A stage run on its own reads an earlier stage's output only as that stage finished it."""
    from trainer.stages.common import require

    run_dir = tmp_path / "run"
    assert run(capsys, causvid_train, "text", "--preset", "micro", "--out", run_dir)[0] == 0
    assert require(run_dir, "text").name == "text.safetensors"
    path = run_dir / "text" / "text.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(RuntimeError, match="delete .*text"):
        require(run_dir, "text")


def test_causvid_stream_refuses_an_out_dir_that_is_a_file(capsys, files):
    code, err = run(capsys, causvid, "stream", "--prompt", PROMPT, "--out-dir", files / "keep.mp4", "--seconds", "1")
    assert_refused(code, err, "--out-dir")
    assert (files / "keep.mp4").read_bytes() == b"precious"


def test_presets_and_own_inputs_that_do_not_go_together(capsys, tmp_path):
    code, err = run(capsys, causvid_train, "pipeline", "--preset", "wan-1.3b", "--out", tmp_path / "a")
    assert_refused(code, err, "--teacher")
    code, err = run(capsys, causvid_train, "pipeline", "--preset", "micro", "--out", tmp_path / "b", "--prompts",
                    tmp_path / "p.txt")
    assert_refused(code, err, "--teacher")
    for name in ("t", "v", "x", "p.txt"):
        (tmp_path / name).write_text("x")
    code, err = run(capsys, causvid_train, "pipeline", "--preset", "shapes", "--out", tmp_path / "c", "--teacher",
                    tmp_path / "t", "--vae", tmp_path / "v", "--text-encoder", tmp_path / "x", "--prompts",
                    tmp_path / "p.txt")
    assert_refused(code, err, "wan-tiny")
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))


def test_debug_is_taken_after_the_command_too(capsys, files):
    code, err = run(capsys, causvid, "generate", "--prompt", PROMPT, "--steps", "500,750", "--out", files / "k.mp4",
                    "--debug")
    assert code == 2 and "unrecognized" not in err


def test_stream_and_live_check_memory_too(capsys, files, monkeypatch):
    monkeypatch.setattr("causvid_core.validate.physical_memory", lambda: 24 * 2 ** 30)
    code, err = run(capsys, causvid, "stream", "--prompt", PROMPT, "--width", "1000000", "--out-dir", files / "s")
    assert_refused(code, err, "--allow-large")
    code, err = run(capsys, causvid, "live", "--width", "1000000", "--out-dir", files / "l")
    assert_refused(code, err, "--allow-large")
