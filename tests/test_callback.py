"""LoRPCallback through Trainer.validate: statistics, plans, failures and several processes.

Calling conventions and batch forms: test_callback_conventions.py; stages, reuse,
state and apply=True: test_callback_lifecycle.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import calibration_run
import numpy as np
import pytest
import torch
from calibration_run import (
    Calibrated,
    calibration_data,
    eager_statistics,
    loader,
    trainer,
)
from tiny_models import example_inputs, tiny_model

import lorp_fx
from lorp_fx import LoRPCallback, PruningPlan

HERE = Path(__file__).parent
CausalLM = Calibrated  # keyword calls from dict batches: input_ids, attention_mask, use_cache=False


def test_validate_collects_the_eager_statistics_and_plans():
    model = tiny_model("llama", layers=6)
    cb = LoRPCallback(n_remove=2, method="shortgpt")
    module = CausalLM(model)
    trainer(cb).validate(module, dataloaders=loader())
    assert module.model is model  # the network is back
    plan = cb.plan
    reference = eager_statistics(model, calibration_data())
    np.testing.assert_allclose(plan.similarity, reference.similarity, atol=1e-6)
    np.testing.assert_allclose(plan.statistics.last_token_angular, reference.last_token_angular, atol=1e-6)
    assert plan.statistics.token_count == sum(int(b["attention_mask"].sum()) for b in calibration_data())
    assert plan.points[0] == "model.layers.0:in" and plan.points[-1] == "model.layers.5:out"
    bi = 1 - np.array([reference.similarity[i, i + 1] for i in range(6)])
    np.testing.assert_allclose(plan.statistics.block_influence(), bi, atol=1e-6)
    expected = sorted(np.argsort(bi[1:5])[:2] + 1)
    assert plan.remove == [f"model.layers.{i}" for i in expected]
    assert plan.method == "shortgpt" and len(plan.scores) == 6


def test_the_plan_round_trips_through_json_and_prunes(tmp_path):
    model = tiny_model("llama", layers=6)
    cb = LoRPCallback(n_remove=2, method="shortgpt")
    trainer(cb).validate(CausalLM(model), dataloaders=loader())
    cb.plan.save(tmp_path / "plan.json")
    loaded = PruningPlan.load(tmp_path / "plan.json")
    assert loaded.remove == cb.plan.remove
    np.testing.assert_array_equal(loaded.similarity, cb.plan.similarity)
    pruned = lorp_fx.prune(cb.graph_module, loaded)
    assert len(lorp_fx.find_blocks(pruned)) == 4


def test_same_data_same_plan_and_sleb_uses_the_calibration_loss():
    plans = []
    for _ in range(2):
        cb = LoRPCallback(n_remove=2, method="sleb")
        trainer(cb).validate(CausalLM(tiny_model("llama", layers=6)), dataloaders=loader())
        plans.append(cb.plan)
    assert plans[0].remove == plans[1].remove
    np.testing.assert_array_equal(plans[0].similarity, plans[1].similarity)


def test_sublayer_granularity():
    cb = LoRPCallback(n_remove=3, method="shortgpt", granularity="sublayer")
    trainer(cb).validate(CausalLM(tiny_model("llama", layers=4)), dataloaders=loader())
    assert cb.plan.similarity.shape == (9, 9)
    assert all(name.endswith((".self_attn", ".mlp")) for name in cb.plan.remove)


@pytest.mark.parametrize("family", ["t5", "mixtral", "qwen2_moe", "gpt2"])
def test_other_families_calibrate(family):
    model = tiny_model(family, layers=4)
    data = []
    for seed in range(4):
        inputs = example_inputs(family, batch=1, seq=8, seed=seed)
        data.append({k: v[0] for k, v in inputs.items()})
    cb = LoRPCallback(n_remove=1, method="shortgpt")
    trainer(cb).validate(Calibrated(model, call="unpack"), dataloaders=loader(data))
    stats = cb.plan.statistics
    assert list(stats.blocks) == [b.name for b in lorp_fx.find_blocks(cb.graph_module)]
    assert np.allclose(np.diag(stats.similarity), 1.0)
    assert cb.plan.remove[0] in stats.blocks
    if family == "t5":
        # Two streams: the decoder's first point does not continue the encoder's last.
        assert stats.block_points[4][0] != stats.block_points[3][1]
        pruned = lorp_fx.prune(cb.graph_module, cb.plan)
        assert pruned(**example_inputs("t5")).logits.shape[-1] == 97


# ----------------------------------------------------------------------------- bad input


def test_an_empty_loader_is_refused():
    cb = LoRPCallback(n_remove=1, method="shortgpt")
    module = CausalLM(tiny_model("llama", layers=4))
    model = module.model
    with pytest.raises(lorp_fx.CalibrationError, match="loader is empty"):
        trainer(cb).validate(module, dataloaders=loader([]))
    assert cb.plan is None and module.model is model


def test_a_batch_without_valid_tokens_fails_and_restores_the_network():
    data = calibration_data()
    for item in data[:2]:
        item["attention_mask"] = torch.zeros_like(item["attention_mask"])
    model = tiny_model("llama", layers=4)
    module = CausalLM(model)
    with pytest.raises(lorp_fx.CalibrationError, match="no valid tokens"):
        trainer(LoRPCallback(n_remove=1, method="shortgpt")).validate(module, dataloaders=loader(data))
    assert module.model is model


def test_nan_names_the_block_where_it_first_appears():
    model = tiny_model("llama", layers=4)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.fill_(float("nan"))
    module = CausalLM(model)
    with pytest.raises(lorp_fx.CalibrationError, match="output of model.layers.2"):
        trainer(LoRPCallback(n_remove=1, method="shortgpt")).validate(module, dataloaders=loader())
    assert module.model is model


def test_budgets_that_cannot_be_met():
    with pytest.raises(lorp_fx.BudgetError, match="at least 1"):
        LoRPCallback(n_remove=0)
    with pytest.raises(lorp_fx.BudgetError, match="exactly one budget"):
        LoRPCallback(n_remove=2, ratio=0.5)
    model = tiny_model("llama", layers=4)
    module = CausalLM(model)
    with pytest.raises(lorp_fx.BudgetError, match="cannot remove 9 of 4 layer blocks"):
        trainer(LoRPCallback(n_remove=9, method="shortgpt")).validate(module, dataloaders=loader())
    assert module.model is model


def test_a_missing_network_attribute_is_named():
    cb = LoRPCallback(n_remove=1, method="shortgpt", attribute="net")
    with pytest.raises(lorp_fx.LoRPError, match="no network attribute 'net'.*attribute="):
        trainer(cb).validate(CausalLM(tiny_model("llama", layers=4)), dataloaders=loader())


# ----------------------------------------------------------------------------- several processes


def run_calibration(tmp_path: Path, strategy: str, devices: int, method: str = "shortgpt", *sizes: int) -> Path:
    out = tmp_path / f"{strategy}-{devices}-{method}"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, str(HERE / "calibration_run.py"), str(out), strategy, str(devices), method, *map(str, sizes)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The plan of calibration_run.py with one device, run in this process (the reference the launches match)."""
    out = tmp_path_factory.mktemp("single")
    calibration_run.main(out, "auto", 1)
    return json.loads((out / "rank0.json").read_text())


@pytest.fixture(scope="module")
def lorp_on_two_ranks(tmp_path_factory) -> tuple[dict, list[dict], dict]:
    """One process's plan of the default selector (16 sequences in batches of 4, 3 of 6 layers removed), run in this
    process, and the plans of a 2-rank DDP launch of the same; shared by the two tests that compare them (one
    launch instead of two: a launch is most of a DDP test's time)."""
    sizes = (3, 16, 4)  # remove 3 of 6 layers, 16 sequences, batches of 4
    one = tmp_path_factory.mktemp("one")
    calibration_run.main(one, "auto", 1, "lorp", *sizes)
    ddp = run_calibration(tmp_path_factory.mktemp("ddp"), "ddp", 2, "lorp", *sizes)
    ranks = [json.loads((ddp / f"rank{r}.json").read_text()) for r in range(2)]
    return json.loads((one / "rank0.json").read_text()), ranks, json.loads((ddp / "plan.json").read_text())


@pytest.mark.distributed
def test_two_ddp_processes_give_the_single_process_statistics(lorp_on_two_ranks):
    single, ranks, written = lorp_on_two_ranks
    for plan in ranks:
        np.testing.assert_allclose(plan["statistics"]["similarity"], single["statistics"]["similarity"], atol=1e-5)
        assert plan["statistics"]["token_count"] == single["statistics"]["token_count"]
        assert plan["remove"] == single["remove"]
    assert written["remove"] == single["remove"]


@pytest.mark.distributed
def test_ddp_measures_the_loss_on_the_single_process_windows_and_chooses_its_layers(lorp_on_two_ranks):
    """Issue 26: 16 sequences in batches of 4 on 2 ranks; each rank used to measure candidates on its own first
    loss batches (other windows than one process's) and chose 1, 2, 4 against one process's 1, 3, 6."""
    single, ranks, _ = lorp_on_two_ranks
    for rank in ranks:
        assert rank["remove"] == single["remove"]
        steps, reference = rank["details"]["steps"], single["details"]["steps"]
        assert [s["removed"] for s in steps] == [s["removed"] for s in reference]
        # the same per-window losses, summed in another order: float32 rounding of a sum of 16 numbers at most
        np.testing.assert_allclose([s["loss"] for s in steps], [s["loss"] for s in reference], rtol=1e-6)


@pytest.mark.distributed
def test_ddp_judges_the_compensated_loss_and_folds_the_maps_of_one_process(tmp_path):
    """Issue 26: LoRPCallback(compensate="cosine", apply=True) on 2 DDP ranks: each rank fits and measures the
    windows it holds and the sums are all-reduced, so the plan, the measured losses, the maps and the pruned
    network are one process's (16 sequences in batches of 4: the loss windows are batch 0 on rank 0 and batch 1 on
    rank 1, the maps are fitted on batches 2 and 3)."""
    sizes = (3, 16, 4)
    one = tmp_path / "one"
    one.mkdir()
    calibration_run.main(one, "auto", 1, "lorp", *sizes, compensate="cosine")
    single = json.loads((one / "rank0.json").read_text())
    single_maps = json.loads((one / "rank0-compensation.json").read_text())
    assert single_maps["compensation"]["gaps"], "no map was folded: the maps are not compared"
    ddp = run_calibration(tmp_path, "ddp", 2, "lorp", *sizes, "--compensate=cosine")
    for r in range(2):
        rank = json.loads((ddp / f"rank{r}.json").read_text())
        maps = json.loads((ddp / f"rank{r}-compensation.json").read_text())
        assert rank["remove"] == single["remove"]
        steps, reference = rank["details"]["steps"], single["details"]["steps"]
        assert [s["removed"] for s in steps] == [s["removed"] for s in reference]
        # per-window losses summed in another order (float64 sums of float32 window losses)
        np.testing.assert_allclose([s["loss"] for s in steps], [s["loss"] for s in reference], rtol=1e-6)
        ours, theirs = maps["compensation"], single_maps["compensation"]
        assert [g["fold_into"] for g in ours["gaps"]] == [g["fold_into"] for g in theirs["gaps"]]
        assert ours["calibration_loss"] == pytest.approx(theirs["calibration_loss"], rel=1e-6)
        assert maps["weights"].keys() == single_maps["weights"].keys()
        for name, total in single_maps["weights"].items():
            assert maps["weights"][name] == pytest.approx(total, rel=1e-5, abs=1e-5)


@pytest.mark.distributed
def test_ddp_spawn_hands_the_plan_to_the_parent_through_plan_path(tmp_path, single):
    spawn = run_calibration(tmp_path, "ddp_spawn", 2)
    parent = json.loads((spawn / "parent.json").read_text())
    assert parent is not None and parent["remove"] == single["remove"]
    np.testing.assert_allclose(parent["statistics"]["similarity"], single["statistics"]["similarity"], atol=1e-5)
