"""Hypothesis: on random residual architectures, `prune` keeps the interface and the arithmetic."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import legal_removals
from torch import nn

import lorp_fx


class Branch(nn.Module):
    """f(x): two parallel linears summed (an add that is not residual), an activation, a linear."""

    def __init__(self, width: int):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return self.out(torch.tanh(self.a(x) + self.b(x)) + 0.5)


class Block(nn.Module):
    def __init__(self, width: int, post_norm: bool, sublayers: int):
        super().__init__()
        self.post_norm = post_norm
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(sublayers))
        self.branches = nn.ModuleList(Branch(width) for _ in range(sublayers))

    def forward(self, x):
        for norm, branch in zip(self.norms, self.branches):
            x = norm(x + branch(x)) if self.post_norm else x + branch(norm(x))
        return x


class ResidualNet(nn.Module):
    def __init__(self, depth: int, width: int, post_norm: bool, sublayers: int):
        super().__init__()
        self.embed = nn.Linear(3, width)
        self.position = nn.Parameter(torch.randn(width) * 0.1)
        self.blocks = nn.ModuleList(Block(width, post_norm, sublayers) for _ in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        h = self.embed(x) + self.position  # not residual: neither operand is computed from the other
        for block in self.blocks:
            h = block(h)
        return {"logits": self.head(h), "hidden": h}


def without(model: ResidualNet, remove: set[int]) -> ResidualNet:
    reference = copy.deepcopy(model)
    reference.blocks = nn.ModuleList(b for i, b in enumerate(reference.blocks) if i not in remove)
    return reference


@st.composite
def networks_and_removals(draw):
    depth = draw(st.integers(2, 6))
    width = draw(st.sampled_from([4, 8, 12]))
    post_norm = draw(st.booleans())
    sublayers = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = ResidualNet(depth, width, post_norm, sublayers).eval()
    remove = draw(legal_removals(depth))
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    x = torch.randn(batch, length, 3, generator=torch.Generator().manual_seed(seed))
    return model, remove, x


def names(remove):
    return [f"blocks.{i}" for i in sorted(remove)]


def assert_same_outputs(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-5)


@settings(max_examples=40)
@given(networks_and_removals())
def test_pruned_graph_equals_the_eager_network_without_those_blocks(case):
    model, remove, x = case
    gm = lorp_fx.trace(model)
    blocks = lorp_fx.find_blocks(gm)
    assert [b.name for b in blocks] == [f"blocks.{i}" for i in range(len(model.blocks))]
    with torch.no_grad():
        assert_same_outputs(lorp_fx.prune(gm, names(remove), allow_empty=True)(x), without(model, remove)(x))


@settings(max_examples=25)
@given(networks_and_removals())
def test_prune_never_mutates_its_input(case):
    model, remove, x = case
    gm = lorp_fx.trace(model)
    code, before = gm.code, gm(x)
    lorp_fx.prune(gm, names(remove), allow_empty=True)
    assert gm.code == code
    assert_same_outputs(gm(x), before, atol=0)


@settings(max_examples=25)
@given(networks_and_removals())
def test_removing_nothing_is_the_identity(case):
    model, _, x = case
    gm = lorp_fx.trace(model)
    same = lorp_fx.prune(gm, [], allow_empty=True)
    assert same is not gm and same.code == gm.code
    assert_same_outputs(same(x), gm(x), atol=0)
    with pytest.raises(lorp_fx.PlanError, match="allow_empty=True"):  # an empty removal is a mistake unless asked for
        lorp_fx.prune(gm, [])


@settings(max_examples=25)
@given(networks_and_removals(), st.randoms(use_true_random=False))
def test_two_steps_equal_one(case, random):
    model, remove, x = case
    gm = lorp_fx.trace(model)
    first = set(random.sample(sorted(remove), len(remove) // 2))
    stepwise = lorp_fx.prune(lorp_fx.prune(gm, names(first), allow_empty=True), names(remove - first), allow_empty=True)
    at_once = lorp_fx.prune(gm, names(remove), allow_empty=True)
    assert_same_outputs(stepwise(x), at_once(x), atol=0)
    assert sum(p.numel() for p in stepwise.parameters()) == sum(p.numel() for p in at_once.parameters())


@settings(max_examples=25)
@given(networks_and_removals())
def test_sublayers_are_found_and_removed_one_by_one(case):
    model, _, x = case
    gm = lorp_fx.trace(model)
    sublayers = lorp_fx.find_blocks(gm, granularity="sublayer")
    assert len(sublayers) == len(model.blocks) * len(model.blocks[0].branches)
    assert all(b.kind == "mlp" for b in sublayers)
    one = sublayers[len(sublayers) // 2]
    if len(sublayers) < 3:  # the budget rule keeps two blocks
        with pytest.raises(lorp_fx.BudgetError, match="at least 2 must stay"):
            lorp_fx.prune(gm, [one.name])
        return
    pruned = lorp_fx.prune(gm, [one.name])
    assert len(lorp_fx.find_blocks(pruned, granularity="sublayer")) == len(sublayers) - 1
    assert pruned(x)["logits"].shape == gm(x)["logits"].shape


def test_parameter_count_drops_by_exactly_the_removed_blocks():
    torch.manual_seed(0)
    model = ResidualNet(4, 8, post_norm=False, sublayers=2)
    gm = lorp_fx.trace(model)
    pruned = lorp_fx.prune(gm, ["blocks.1", "blocks.3"])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(gm) - count(pruned) == count(model.blocks[1]) + count(model.blocks[3])
