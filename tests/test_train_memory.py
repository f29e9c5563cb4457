"""`causvid-train bench-memory`: the fake-tensor accounting of a DMD step equals a real run's at small size, FSDP
over a fake process group shards the model states, and the CLI prints the JSON line (and refuses bad input)."""
from __future__ import annotations

import json

import pytest
import torch

from trainer.config import apply_overrides, preset
from trainer.memory import bench_dmd_memory

SMALL = dict(size=(32, 32), frames=9)


def cpu_flash(q, k, v):
    """The CPU's flash kernel (output and log-sum-exp, no attention matrix), which also runs on fake tensors: the
    same allocations in both runs."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]


def tiny(*sets: str):
    return apply_overrides(preset("wan-tiny"), ["dmd.checkpointing=true", *sets])


@pytest.mark.parametrize("generator_input", ["rollout", "data"])
def test_fake_accounting_of_a_dmd_step_equals_a_real_run(generator_input):
    cfg = tiny(f"dmd.generator_input={generator_input}", "dmd.grad_accum=2")
    fake = bench_dmd_memory(cfg, gpus=1, attention=cpu_flash, **SMALL)
    real = bench_dmd_memory(cfg, gpus=1, attention=cpu_flash, real_device="cpu", **SMALL)
    assert real["measured_on"] == "a real run on cpu" and fake["micro_batches_run"] == 2
    assert fake["parts"]["model_states_before_step"] == real["parts"]["model_states_before_step"]
    assert fake["parts"]["optimizer_states"] == real["parts"]["optimizer_states"]
    assert abs(fake["peak_bytes"] - real["peak_bytes"]) <= 0.02 * real["peak_bytes"], (fake, real)
    assert fake["parts"]["step_peak_over_resident"] > 0


def test_fsdp_over_a_fake_process_group_shards_the_model_states():
    one = bench_dmd_memory(tiny("parallel.strategy=fsdp"), gpus=1, attention=cpu_flash, **SMALL)
    two = bench_dmd_memory(tiny("parallel.strategy=fsdp"), gpus=2, attention=cpu_flash, **SMALL)
    for key in ("model_states_before_step", "optimizer_states"):
        half = one["parts"][key] / 2
        assert abs(two["parts"][key] - half) <= 0.05 * half, (key, one["parts"][key], two["parts"][key])
    assert two["micro_batch_per_gpu"] == 1 and one["micro_batch_per_gpu"] == 2
    assert not torch.distributed.is_initialized()  # the fake process group is taken down


def test_bench_memory_cli_prints_json_and_refuses_bad_input(capsys):
    from trainer.cli import main as causvid_train

    base = ["bench-memory", "--preset", "wan-tiny", "--gpus", "1"]  # the preset's clips: 32x32, 9 frames
    assert causvid_train(base) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["bench"] == "train-memory" and row["peak_bytes"] > row["parts"]["model_states_before_step"] > 0
    assert row["size"] == "32x32" and row["frames"] == 9
    for bad, says in ((["--size", "32"], "WIDTHxHEIGHT"), (["--gpus", "3"], "multiple of gpus"),
                      (["--frames", "8"], "4k+1"), (["--set", "parallel.strategy=zero"], "ddp or fsdp"),
                      (["--set", "dmd.grad_accum=0"], "dmd.grad_accum"), (["--set", "dmd.gen_every=0"], "gen_every")):
        assert causvid_train(base + bad) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_a_real_cuda_dmd_step_allocates_what_the_tracker_counts():
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    real = bench_dmd_memory(tiny(), gpus=1, real_device="cuda", **SMALL)
    allocated = torch.cuda.max_memory_allocated() - base
    assert abs(real["peak_bytes"] - allocated) <= 0.1 * allocated, (real["peak_bytes"], allocated)


REAL_FSDP = """
import json, sys, torch.distributed as dist
sys.path.insert(0, {tests!r})
dist.init_process_group("gloo")
from test_train_memory import tiny, cpu_flash
from trainer.memory import bench_dmd_memory
r = bench_dmd_memory(tiny("parallel.strategy=fsdp"), gpus=2, attention=cpu_flash, real_device="cpu", **{size!r})
if dist.get_rank() == 0:
    print(json.dumps(r))
dist.destroy_process_group()
"""


def test_fake_fsdp_accounting_equals_two_real_gloo_processes(tmp_path):
    """The fake process group's FSDP step is what two real processes (gloo, real tensors) allocate on rank 0: the
    same shards, optimizer state, what FSDP keeps between steps, and the step's peak."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "real_fsdp.py"
    size = dict(size=(64, 64), frames=33)  # large enough that FSDP's small fixed buffers do not dominate
    script.write_text(REAL_FSDP.format(tests=str(Path(__file__).parent), size=size))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29613", str(script)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    real = json.loads(r.stdout.strip().splitlines()[-1])
    fake = bench_dmd_memory(tiny("parallel.strategy=fsdp"), gpus=2, attention=cpu_flash, **size)
    for key in ("model_states_before_step", "optimizer_states"):
        assert fake["parts"][key] == real["parts"][key], key
    for key in ("kept_between_steps", "step_peak_over_resident"):
        assert abs(fake["parts"][key] - real["parts"][key]) <= 0.02 * real["parts"][key], (key, fake, real)
    assert abs(fake["peak_bytes"] - real["peak_bytes"]) <= 0.02 * real["peak_bytes"]
