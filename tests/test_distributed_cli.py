"""`lorp-fx prune --devices 2` (two gloo CPU processes through Lightning) against one process."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from saved_models import calibration_text, report, saved_tiny, similarity

from lorp_fx.cli import main

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
# 12 windows in batches of 4: rank 0 calibrates batches 0 and 2, rank 1 batch 1; the
# loss windows (the first 8) are batch 0 on rank 0 and batch 1 on rank 1.
ARGS = ["--remove", "2", "--calib-samples", "12", "--seq-len", "24", "--device", "cpu", "--dtype", "float32"]


def lorp_fx(*arguments, env=None) -> subprocess.CompletedProcess:
    """`lorp-fx prune` in processes of its own: what `--devices 2` starts and how a failing rank ends are the point."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lorp_fx.cli", "prune", *map(str, arguments)], capture_output=True,
                          text=True, env=environment, timeout=900)


def one_process(*arguments) -> None:
    """The single-process reference, run in this process like the other CLI tests (one start-up less)."""
    assert main(["prune", *map(str, arguments)]) == 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def self_calibrated(model_dir, tmp_path_factory) -> tuple[Path, Path, str]:
    """The default run (self-calibrated, compensated judge, 3 of 6 layers) in one process, here, and under
    --devices 2: the two outputs and the launch's stderr, shared by the two tests that compare them (one launch
    instead of two: the launch is most of such a test's time)."""
    args = [*ARGS[2:], "--remove", "3"]
    one, two = tmp_path_factory.mktemp("one") / "out", tmp_path_factory.mktemp("two") / "out"
    one_process("--model", model_dir, *args, "--out", one)
    done = lorp_fx("--model", model_dir, *args, "--devices", "2", "--out", two)
    assert done.returncode == 0, done.stderr[-2000:]
    return one, two, done.stderr


def test_two_processes_give_the_single_process_plan_statistics_and_weights(self_calibrated):
    """Self-calibrated: each rank samples its own windows; the plan, S and the compensated weights agree."""
    single, out, _ = self_calibrated
    assert report(out)["removed"] == report(single)["removed"]
    assert report(out)["calibration"]["tokens"] == report(single)["calibration"]["tokens"] == 12 * 24
    assert np.abs(similarity(out) - similarity(single)).max() < 1e-5
    assert report(out)["distributed"] == {"devices": 2, "strategy": "ddp", "loss_batches_per_rank": [1, 1]}
    ours, theirs = load_file(out / "model.safetensors"), load_file(single / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-5


@pytest.mark.parametrize("rank", [1, 0])
def test_a_rank_that_fails_stops_the_others_and_nothing_is_written(model_dir, tmp_path, rank):
    out = tmp_path / "out"
    done = lorp_fx("--model", model_dir, *ARGS, "--devices", "2", "--out", out, env={"LORP_FX_TEST_FAIL_RANK": str(rank)})
    assert done.returncode != 0
    assert f"rank {rank} failed on purpose" in done.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no half-written temporary either


def test_an_encoder_decoder_gets_the_single_process_plan(tmp_path):
    """T5 has no causal-LM loss: one process chooses from the statistics alone, and so do two (they used to
    measure the decoder's loss and choose other blocks)."""
    model_dir, text = saved_tiny(tmp_path, "t5"), calibration_text(tmp_path)
    outs = {devices: tmp_path / f"out{devices}" for devices in (1, 2)}
    one_process("--model", model_dir, *ARGS, "--calib-file", text, "--out", outs[1])
    done = lorp_fx("--model", model_dir, *ARGS, "--calib-file", text, "--devices", 2, "--out", outs[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert report(outs[2])["removed"] == report(outs[1])["removed"]
    assert report(outs[2])["scores"] == pytest.approx(report(outs[1])["scores"], abs=1e-5)
    assert report(outs[2])["distributed"]["loss_batches_per_rank"] == [0, 0]


def test_ranks_holding_unequal_numbers_of_loss_batches_measure_the_single_process_loss(model_dir, tmp_path):
    """3 loss windows in batches of 1 over 2 ranks: rank 0 holds two, rank 1 one. The ranks' losses are
    weighted by their batches (an unweighted mean of the two ranks chose other blocks than one process)."""
    text = calibration_text(tmp_path)
    args = ["--remove", "3", "--calib-samples", "8", "--seq-len", "24", "--device", "cpu", "--dtype", "float32",
            "--calib-file", text, "--method", "sleb", "--compensate", "none", "--loss-windows", "3", "--batch-size", "1"]
    outs = {devices: tmp_path / f"out{devices}" for devices in (1, 2)}
    one_process("--model", model_dir, *args, "--out", outs[1])
    done = lorp_fx("--model", model_dir, *args, "--devices", 2, "--out", outs[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert report(outs[2])["distributed"]["loss_batches_per_rank"] == [2, 1]
    assert report(outs[2])["removed"] == report(outs[1])["removed"]
    one, two = report(outs[1])["scores"], report(outs[2])["scores"]
    assert two == pytest.approx(one, abs=1e-5)


@pytest.mark.distributed
def test_two_processes_heal_as_one_process_with_their_joint_batch(model_dir, tmp_path):
    """Each step's global batch is split over the ranks and DDP averages their gradients: two processes of 2
    windows a step train as one process of 4 (`healing/data.py`), to float rounding."""
    text = calibration_text(tmp_path)
    heal = ["--calib-file", text, "--heal", "--heal-steps", "3", "--heal-seq-len", "16", "--heal-held-out", "2",
            "--heal-lr", "3e-3", "--heal-precision", "32"]  # float32: bf16 kernels round per process layout
    one, two = tmp_path / "one", tmp_path / "two"
    one_process("--model", model_dir, *ARGS, *heal, "--heal-batch-size", "4", "--out", one)
    done = lorp_fx("--model", model_dir, *ARGS, *heal, "--heal-batch-size", "2", "--devices", "2", "--out", two)
    assert done.returncode == 0, done.stderr[-2000:]
    assert report(two)["healing"]["devices"] == 2 and report(two)["healing"]["tokens"] == report(one)["healing"]["tokens"]
    ours, theirs = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-4
    assert not (tmp_path / "two.healing").exists()


def test_two_processes_judge_the_compensated_loss_as_one_process(self_calibrated):
    """Issue 26: with compensation on (the default), --devices 2 runs the compensating judge on each rank's windows
    and sums over the ranks: the layers, the measured losses and the maps are one process's (the ranks used to
    judge the uncompensated loss and chose other layers: 3 of 6, 2..4 in one process, 1, 3, 4 in two)."""
    one, two, stderr = self_calibrated
    assert "uncompensated" not in stderr
    assert report(two)["removed"] == report(one)["removed"]
    ours, theirs = report(two)["compensation"], report(one)["compensation"]
    assert ours["calibration_loss"] == pytest.approx(theirs["calibration_loss"], rel=1e-5)
    assert [g["fold_into"] for g in ours["gaps"]] == [g["fold_into"] for g in theirs["gaps"]]
    assert report(two)["scores"] == pytest.approx(report(one)["scores"], rel=1e-5)
    weights_two, weights_one = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    assert max(float((weights_two[k] - weights_one[k]).abs().max()) for k in weights_one) < 1e-5
