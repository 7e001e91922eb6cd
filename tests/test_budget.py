"""The one budget rule (lorp_fx/budget.py), and that every step applies it the same way."""

import pytest

import lorp_fx
from lorp_fx.core.budget import (
    MIN_KEPT,
    budget_from_ratio,
    check_budget,
    check_kept,
    check_stack_budget,
    resolve_budget,
)
from lorp_fx.core.errors import BudgetError


def test_remove_at_least_one_keep_at_least_two():
    check_budget(5, 3)
    with pytest.raises(BudgetError, match="at least 1"):
        check_budget(5, 0)
    with pytest.raises(BudgetError, match=f"at least {MIN_KEPT} must stay; remove at most 3"):
        check_budget(5, 4)
    with pytest.raises(BudgetError, match="whole number"):
        check_budget(5, 1.5)
    with pytest.raises(BudgetError, match="only 2 of 5 are removable"):
        check_budget(5, 3, eligible=2)


def test_every_stream_keeps_a_block():
    check_kept({"encoder": 3, "decoder": 2}, {"encoder": 2, "decoder": 1})
    with pytest.raises(BudgetError, match="all 2 layers of decoder"):
        check_kept({"encoder": 3, "decoder": 2}, {"decoder": 2})
    with pytest.raises(BudgetError, match="all 4 layers of model.layers"):
        check_stack_budget({"model.layers": 4}, [f"model.layers.{i}" for i in range(4)])
    with pytest.raises(BudgetError, match="at least 2 must stay"):
        check_stack_budget({"model.layers": 4}, [f"model.layers.{i}" for i in range(3)])


def test_budgets_from_a_ratio():
    assert budget_from_ratio(30, 0.2) == 6 and budget_from_ratio(30, 0.01) == 1
    assert resolve_budget(30, ratio=0.3) == 9 and resolve_budget(30, 4) == 4
    for bad in (0.0, 1.0, -0.1, True, "0.2"):
        with pytest.raises(BudgetError, match="between 0 and 1"):
            budget_from_ratio(30, bad)
    with pytest.raises(BudgetError, match="exactly one budget"):
        resolve_budget(30, 2, 0.1)


@pytest.mark.parametrize("n_remove", [3, 4])
def test_selection_config_callback_and_surgery_refuse_the_same_budgets(n_remove):
    """4 layers: removing 2 is allowed everywhere, 3 or 4 nowhere (the old code disagreed: 1 / 2 layers kept)."""
    from dataclasses import replace

    from strategies import random_walk_stats
    from tiny_models import tiny_model

    stats = replace(random_walk_stats(4, 0))
    with pytest.raises(BudgetError):
        lorp_fx.select(stats, n_remove, method="shortgpt", protected=[])
    with pytest.raises(BudgetError):
        lorp_fx.remove_layers(tiny_model("llama", layers=4), [f"model.layers.{i}" for i in range(n_remove)])
    lorp_fx.select(stats, 2, method="shortgpt", protected=[])
    lorp_fx.remove_layers(tiny_model("llama", layers=4), ["model.layers.1", "model.layers.2"])
