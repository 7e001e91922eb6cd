"""The whole CLI in bfloat16 against float32, and with weights offloaded to disk against none."""

import numpy as np
import pytest
from safetensors.torch import load_file
from saved_models import calibration_text, report, saved_tiny, similarity

from lorp_fx.cli import main

ARGS = ["--remove", "2", "--calib-samples", "8", "--seq-len", "24", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    return saved_tiny(root), calibration_text(root)


@pytest.fixture(scope="module")
def float32_run(files, tmp_path_factory):
    model_dir, text = files
    out = tmp_path_factory.mktemp("float32") / "out"
    assert main(["prune", "--model", str(model_dir), *ARGS, "--calib-file", str(text), "--dtype", "float32", "--out", str(out)]) == 0
    return out


def test_bfloat16_gives_the_float32_plan_and_similarity(files, float32_run, tmp_path):
    model_dir, text = files
    out = tmp_path / "out"
    assert main(["prune", "--model", str(model_dir), *ARGS, "--calib-file", str(text), "--dtype", "bfloat16", "--out", str(out)]) == 0
    assert report(out)["dtype"] == "bfloat16" and report(float32_run)["dtype"] == "float32"
    assert report(out)["removed"] == report(float32_run)["removed"]
    assert np.abs(similarity(out) - similarity(float32_run)).max() < 1e-2
    assert all(str(t.dtype) == "torch.bfloat16" for t in load_file(out / "model.safetensors").values())


@pytest.mark.parametrize("budget", ["100KB", "1KB"])
def test_a_model_offloaded_to_disk_gives_the_plan_and_weights_of_one_in_memory(files, float32_run, tmp_path, budget):
    """100 KB keeps the embedding and one layer in memory, five layers and the head go to disk; at 1 KB every
    weight is on disk, the input embedding too (the inputs must not follow it to "meta")."""
    model_dir, text = files
    out = tmp_path / "out"
    assert main(["prune", "--model", str(model_dir), *ARGS, "--calib-file", str(text), "--dtype", "float32",
                 "--device-map", "auto", "--max-memory", f"cpu={budget}", "--offload-dir", str(tmp_path / "offload"),
                 "--eval-file", str(text), "--eval-samples", "2", "--eval-seq-len", "24", "--out", str(out)]) == 0
    placed = report(out)["device"]["device_map"]
    assert "disk" in placed.values() and placed.get("model.layers.5", placed.get("")) == "disk"
    assert (set(placed.values()) == {"disk"}) == (budget == "1KB")
    evaluation = report(out)["evaluation"]
    assert np.isfinite(evaluation["ppl_before"]) and np.isfinite(evaluation["ppl_after"])
    assert report(out)["removed"] == report(float32_run)["removed"]
    assert np.abs(similarity(out) - similarity(float32_run)).max() < 1e-5
    assert report(out)["compensation"]["gaps"]  # folded into weights that were offloaded
    ours, theirs = load_file(out / "model.safetensors"), load_file(float32_run / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-5


@pytest.mark.parametrize("memory", [["--max-memory", "cpu=100KB"], []])
def test_a_device_map_refuses_sublayers_in_one_line_before_loading(files, tmp_path, capsys, monkeypatch, memory):
    """Refused whether or not the weights would spill to disk: the rule depends on the options, not on memory."""
    import lorp_fx.cli.commands

    monkeypatch.setattr(lorp_fx.cli.commands, "load_placed", lambda *a, **k: pytest.fail("the weights were loaded"))
    model_dir, text = files
    status = main(["prune", "--model", str(model_dir), *ARGS, "--calib-file", str(text), "--granularity", "sublayer",
                   "--device-map", "auto", *memory, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "layer" in err[-1] and err[-1].startswith("lorp-fx: error:")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where, why", [
    ("", "is empty"), ("a-file", "is not a folder"), ("out", "inside the output directory"),
    ("out/offload", "inside the output directory"), ("a-file/below", "is a file, not a folder"), ("MODEL", "inside the input"),
])
def test_a_bad_offload_dir_is_one_line_before_loading(files, tmp_path, capsys, monkeypatch, where, why):
    import lorp_fx.cli.commands

    monkeypatch.setattr(lorp_fx.cli.commands, "load_placed", lambda *a, **k: pytest.fail("the weights were loaded"))
    model_dir, text = files
    (tmp_path / "a-file").write_text("x")
    offload = "" if not where else str(model_dir / "offload") if where == "MODEL" else str(tmp_path / where)
    status = main(["prune", "--model", str(model_dir), *ARGS, "--calib-file", str(text), "--device-map", "auto",
                   "--max-memory", "cpu=1KB", "--offload-dir", offload, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and why in err[0] and "--offload-dir" in err[0], err
    assert not (tmp_path / "out").exists() and not (model_dir / "offload").exists()


def test_more_processes_than_calibration_batches_is_one_line_before_loading(files, tmp_path, capsys, monkeypatch):
    import lorp_fx.cli.commands
    import lorp_fx.io.placement

    monkeypatch.setattr(lorp_fx.cli.commands, "load_placed", lambda *a, **k: pytest.fail("the weights were loaded"))
    monkeypatch.setattr(lorp_fx.io.placement, "available_cores", lambda: 4)
    model_dir, text = files
    status = main(["prune", "--model", str(model_dir), "--remove", "2", "--calib-samples", "4", "--seq-len", "24",
                   "--device", "cpu", "--calib-file", str(text), "--devices", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "makes 1" in err[0] and "--calib-samples" in err[0], err


def test_the_report_gives_every_step_in_passes(float32_run):
    got = report(float32_run)
    passes, seconds, unit = got["timings_in_passes"], got["timings"], got["pass_unit"]
    assert unit["seconds"] > 0 and unit["tokens"] == 8 * 24
    rounding = 0.006 / unit["seconds"] + 0.002  # report.json rounds seconds to 0.01 and passes to 0.001
    for step, value in seconds.items():
        assert passes[step.removesuffix("_s")] == pytest.approx(value / unit["seconds"], abs=rounding)
    assert passes["total"] == pytest.approx(sum(passes[s] for s in passes if s != "total"), abs=0.001 * len(passes))
    assert got["calibration"]["statistics"].startswith("the selection's caching pass")  # text + the compensating judge
