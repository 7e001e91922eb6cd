"""`PruningPlan.from_dict` / `load`: a malformed plan is a PlanError naming the field, never a wrong pruning."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import random_walk_stats

import lorp_fx
from lorp_fx.core.budget import check_stream_budget
from lorp_fx.core.errors import BudgetError, LoRPError, PlanError
from lorp_fx.core.plan import PruningPlan
from lorp_fx.selection.registry import SELECTORS, options_for, select


def toy_loss(stats):
    influence = dict(zip(stats.blocks, stats.block_influence()))
    return lambda removed: sum(influence[b] for b in removed) + 0.05 * len(removed) ** 2


def good_plan() -> dict:
    stats = random_walk_stats(6, seed=3)
    return select(stats, 2, method="shortgpt").to_dict()


@pytest.mark.parametrize("method", sorted(SELECTORS))
def test_every_method_plan_survives_a_round_trip(tmp_path, method):
    stats = random_walk_stats(8, seed=1)
    plan = select(stats, 3, method=method, **options_for(method, loss_fn=toy_loss(stats), seed=0))
    plan.save(tmp_path / "plan.json")
    loaded = PruningPlan.load(tmp_path / "plan.json")
    assert loaded.to_dict() == json.loads(plan.to_json())
    assert loaded.remove == plan.remove and loaded.keep == plan.keep


def test_saving_a_plan_where_it_cannot_go_is_one_line_and_leaves_nothing(tmp_path):
    plan = PruningPlan.from_dict(good_plan())
    with pytest.raises(PlanError, match=f"the folder {tmp_path / 'missing'} does not exist"):
        plan.save(tmp_path / "missing" / "plan.json")
    with pytest.raises(PlanError, match="is a folder"):
        plan.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_plan_without_statistics_is_accepted():
    plan = PruningPlan.from_dict({"remove": ["model.layers.3"], "method": "manual"})
    assert plan.remove == ["model.layers.3"] and plan.granularity == "layer" and plan.statistics is None


def broken(**changes) -> dict:
    data = good_plan()
    for key, value in changes.items():
        if value is DELETE:
            data.pop(key)
        else:
            data[key] = value
    return data


DELETE = object()
STATS = good_plan()["statistics"]


@pytest.mark.parametrize("data, fragment", [
    (["layers.1"], "got a list"),
    ("layers.1", "got a string"),
    (None, "got a null"),
    (broken(remove="layers.1"), r"'remove' must be a list of block names, got the string 'layers.1'; write \[\"layers.1\"\]"),
    (broken(remove={"layers.1": True}), "'remove' must be a list of block names, got a JSON object"),
    (broken(remove=["layers.1", 3]), r"'remove\[\]' must be a non-empty string, got 3"),
    (broken(remove=["layers.1", "layers.1"]), "names 'layers.1' more than once"),
    (broken(remove=["layers.1", "layers 2"]), "holds 'layers 2', which is not a block name"),
    (broken(method="lorp\nrm -rf"), "'method' must be a short name"),
    (broken(format=2), "format 2, newer than this lorp-fx reads"),
    (broken(format="1"), "'format' must be a whole number"),
    (broken(remove=DELETE), "'remove' is missing"),
    (broken(method=DELETE), "'method' is missing"),
    (broken(method=7), "'method' must be a non-empty string"),
    (broken(granularity="block"), "'granularity' must be one of layer, sublayer, got 'block'"),
    (broken(scores={"layers.1": float("nan")}), r"'scores\['layers.1'\]' must be a number \(not NaN\)"),
    (broken(scores=[1, 2]), "'scores' must map block names to numbers"),
    (broken(scores={"layers.1": "high"}), r"'scores\['layers.1'\]' must be a number"),
    (broken(rls=float("nan")), "'rls' must be a number"),
    (broken(rls="1.0"), "'rls' must be a number"),
    (broken(clusters="layers.1"), "'clusters' must be a list of lists"),
    (broken(clusters=["layers.1"]), r"'clusters\[\]' must be a list of block names, got the string"),
    (broken(details=[1]), "'details' must be a JSON object"),
    (broken(surprise=1), "field.s. 'surprise' unknown"),
    (broken(statistics=[1, 2]), "'statistics' must be a JSON object"),
    (broken(statistics={**STATS, "similarity": None}), "'statistics' is malformed|statistics.similarity"),
    (broken(statistics={k: v for k, v in STATS.items() if k != "angular"}), "'statistics' lacks angular"),
    (broken(statistics={**STATS, "similarity": [[1.0, 0.5]]}), "'statistics.similarity' must be a finite 7 x 7 matrix"),
    (broken(statistics={**STATS, "similarity": [[math.nan] * 7] * 7}), "'statistics.similarity' must be a finite"),
    (broken(statistics={**STATS, "similarity": [[1, 2], [3]]}), "'statistics' is malformed"),
    (broken(statistics={**STATS, "blocks": "layers.0"}), "'statistics.blocks' must be a list of block names"),
    (broken(statistics={**STATS, "block_points": [[0, 1]]}), "'statistics.block_points' must hold one"),
    (broken(statistics={**STATS, "block_points": [[0, 99]] * 6}), "'statistics.block_points' must hold one"),
    (broken(statistics={**STATS, "token_count": "many"}), "'statistics' is malformed"),
    (broken(remove=["layers.1", "model.layers.9"]), "'remove' names 'model.layers.9', which is not one of the plan's blocks"),
    (broken(scores={"nope": 1.0}), "'scores' names 'nope'"),
    (broken(remove=[f"layers.{i}" for i in range(5)]), "'remove' breaks the budget rule: cannot remove 5 of 6 blocks"),
    (broken(remove=[f"layers.{i}" for i in range(6)]), "'remove' breaks the budget rule: cannot remove all 6 blocks"),
])
def test_a_malformed_plan_is_a_plan_error_naming_the_field(data, fragment):
    with pytest.raises(PlanError, match=fragment):
        PruningPlan.from_dict(data)


def test_loading_a_plan_file_that_is_missing_or_not_json(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        PruningPlan.load(tmp_path / "plan.json")
    (tmp_path / "plan.json").write_text("{half")
    with pytest.raises(PlanError, match="not valid JSON"):
        PruningPlan.load(tmp_path / "plan.json")
    (tmp_path / "plan.json").write_text('["layers.1"]')
    with pytest.raises(PlanError, match="got a list"):
        PruningPlan.load(tmp_path / "plan.json")


def test_an_encoder_decoder_plan_keeps_a_block_in_each_stream():
    from dataclasses import replace

    stats = random_walk_stats(5, seed=0)
    stats = replace(stats, blocks=("encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1", "decoder.block.2"),
                    block_points=((0, 1), (1, 2), (3, 4), (4, 5), (5, 6)), points=tuple(f"p{i}" for i in range(7)),
                    similarity=random_walk_stats(6, seed=0).similarity, angular=random_walk_stats(6, seed=0).angular,
                    last_token_angular=random_walk_stats(6, seed=0).last_token_angular)
    data = {"remove": ["encoder.block.0", "encoder.block.1"], "method": "manual", "statistics": stats.to_dict()}
    with pytest.raises(PlanError, match="cannot remove all 2 blocks of the stream encoder.block.0"):
        PruningPlan.from_dict(data)
    data["remove"] = ["encoder.block.1", "decoder.block.0"]
    assert PruningPlan.from_dict(data).remove == ["encoder.block.1", "decoder.block.0"]


JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200)
@given(data=JSON | st.fixed_dictionaries({"remove": JSON, "method": JSON}, optional={
    "granularity": JSON, "scores": JSON, "rls": JSON, "clusters": JSON, "details": JSON, "statistics": JSON}))
def test_any_json_is_a_plan_or_a_plan_error(data):
    try:
        plan = PruningPlan.from_dict(data)
    except PlanError as error:
        assert "\n" not in str(error) and isinstance(error, LoRPError)
        return
    assert all(isinstance(name, str) and name for name in plan.remove) and plan.granularity in ("layer", "sublayer")


# --------------------------------------------------------------------------- the budget rule on names (the graph pass)


def test_check_stream_budget_keeps_two_blocks_and_one_per_stream():
    layers = [f"model.layers.{i}" for i in range(4)]
    check_stream_budget([layers], layers[:2])
    with pytest.raises(BudgetError, match="at least 2 must stay"):
        check_stream_budget([layers], layers[:3])
    t5 = [["encoder.block.0", "encoder.block.1"], ["decoder.block.0", "decoder.block.1"]]
    with pytest.raises(BudgetError, match="each stack"):
        check_stream_budget(t5, ["decoder.block.0", "decoder.block.1"])


def test_the_graph_pass_refuses_a_plan_that_leaves_one_layer():
    import torch
    from tiny_models import tiny_model, trace_inputs

    model = tiny_model("llama", layers=3)
    gm = lorp_fx.trace(model, trace_inputs("llama"))
    with pytest.raises(BudgetError):
        lorp_fx.prune(gm, ["model.layers.0", "model.layers.1"])
    del torch
