"""Hypothesis: for random networks, removal sets and fixed keyword arguments, the pruned graph called
with the tracing call's exact arguments equals the eager network without those layers, called the same way.

The one documented difference is structural: per-layer outputs keep one slot per layer in the graph
(a removed layer's hidden state is its input, its attention weights are None), where eager deletion
returns shorter tuples. Dropping the removed layers' slots gives eager deletion's output exactly.
"""

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import legal_removals
from tiny_models import FAMILIES, eager_without, example_inputs, layer_lists, tiny_model
from torch import nn

import lorp_fx
from lorp_fx.core.errors import FixedArgumentError

PER_LAYER = ("hidden_states", "attentions", "router_logits")


# --------------------------------------------------------------------------- comparing outputs


def named_parts(output, keys=None) -> dict:
    """An output as name -> value; a tuple output (return_dict=False) is named by the dict output's keys."""
    if isinstance(output, dict):
        return dict(output)
    return dict(zip(keys or [f"[{i}]" for i in range(len(output))], output))


def structure(value):
    """Types, keys and tuple lengths of an output, without the values (a None slot is a value)."""
    if isinstance(value, dict):
        return (type(value).__name__, tuple((k, structure(v)) for k, v in value.items()))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(structure(v) for v in value))
    return "value"


def assert_equals_eager(pruned: dict, eager: dict, removed_slots) -> None:
    assert pruned.keys() == eager.keys()
    for name, value in pruned.items():
        if isinstance(value, tuple) and value and name.endswith(PER_LAYER):
            gone = removed_slots(name)
            if name.endswith(("attentions", "router_logits")) and value:
                assert [i for i, v in enumerate(value) if v is None] == sorted(gone), name
            assert len(value) == len(eager[name]) + len(gone), name
            value = tuple(v for i, v in enumerate(value) if i not in gone)
        assert structure(value) == structure(eager[name]), name
        for mine, theirs in zip(torch.utils._pytree.tree_leaves(value), torch.utils._pytree.tree_leaves(eager[name])):
            torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------- random plain networks


class Block(nn.Module):
    def __init__(self, width: int, sublayers: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(sublayers))
        self.linears = nn.ModuleList(nn.Linear(width, width) for _ in range(sublayers))

    def forward(self, x):
        for norm, linear in zip(self.norms, self.linears):
            x = x + torch.tanh(linear(norm(x)))
        return x


class OptionsNet(nn.Module):
    """A residual network whose output depends on non-tensor options (so it is exported, not symbolically traced)."""

    def __init__(self, depth: int, width: int, sublayers: int, record_inputs: bool):
        super().__init__()
        self.embed = nn.Linear(3, width)
        self.blocks = nn.ModuleList(Block(width, sublayers) for _ in range(depth))
        self.head = nn.Linear(width, 2)
        self.record_inputs = record_inputs

    def forward(self, x, mask=None, *, scale: float = 1.0, return_hidden: bool = False, as_tuple: bool = False):
        h = self.embed(x) * scale
        hidden = []
        for block in self.blocks:
            if self.record_inputs:
                hidden.append(h)  # transformers' convention: the state entering each layer
            h = block(h)
            if not self.record_inputs:
                hidden.append(h)
        logits = self.head(h) if mask is None else self.head(h) * mask[..., None]
        if as_tuple:
            return (logits, tuple(hidden)) if return_hidden else (logits,)
        return {"logits": logits, "hidden_states": tuple(hidden)} if return_hidden else {"logits": logits}


OPTION_VALUES = {"scale": [0.5, 2.0], "return_hidden": [True, False], "as_tuple": [True, False]}


@st.composite
def plain_cases(draw):
    depth, width = draw(st.integers(2, 5)), draw(st.sampled_from([4, 8]))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = OptionsNet(depth, width, draw(st.integers(1, 2)), draw(st.booleans())).eval()
    generator = torch.Generator().manual_seed(seed)
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    call = {"x": torch.randn(batch, length, 3, generator=generator)}
    if draw(st.booleans()):
        call["mask"] = torch.rand(batch, length, generator=generator)
    for name in draw(st.sets(st.sampled_from(sorted(OPTION_VALUES)))):
        call[name] = draw(st.sampled_from(OPTION_VALUES[name]))
    remove = draw(legal_removals(depth))
    return model, call, sorted(remove)


def plain_without(model: OptionsNet, remove: list[int]) -> OptionsNet:
    reference = copy.deepcopy(model)
    reference.blocks = nn.ModuleList(b for i, b in enumerate(model.blocks) if i not in remove)
    return reference


@settings(max_examples=10)
@given(plain_cases())
def test_pruned_plain_graph_called_like_the_trace_equals_eager_deletion(case):
    model, call, remove = case
    gm = lorp_fx.trace(model, call)
    pruned = lorp_fx.prune(gm, [f"blocks.{i}" for i in remove], allow_empty=True)
    with torch.no_grad():
        mine, original, eager = pruned(**call), gm(**call), plain_without(model, remove)(**call)
    assert structure(mine) == structure(original)  # the graph's output structure never changes
    slots = lambda name: set(remove)  # noqa: E731 - one stream: slot i is block i's state
    keys = ["logits", "hidden_states"]
    assert_equals_eager(named_parts(mine, keys), named_parts(eager, keys), slots)
    # the same call, with the tensor passed positionally
    rest = {k: v for k, v in call.items() if k != "x"}
    torch.testing.assert_close(torch.utils._pytree.tree_leaves(pruned(call["x"], **rest)), torch.utils._pytree.tree_leaves(mine))


@settings(max_examples=6)
@given(plain_cases(), st.data())
def test_a_changed_fixed_argument_is_refused_by_name(case, data):
    model, call, remove = case
    fixed = [k for k in call if k in OPTION_VALUES]
    if not fixed:
        call["return_hidden"] = False
        fixed = ["return_hidden"]
    pruned = lorp_fx.prune(lorp_fx.trace(model, call), [f"blocks.{i}" for i in remove], allow_empty=True)
    name = data.draw(st.sampled_from(fixed))
    other = data.draw(st.sampled_from([v for v in OPTION_VALUES[name] if v != call[name]]))
    with pytest.raises(FixedArgumentError) as caught:
        pruned(**{**call, name: other})
    assert f"{name}={other!r}" in str(caught.value) and f"traced with {name}={call[name]!r}" in str(caught.value)


# --------------------------------------------------------------------------- tiny transformers


def family_options(family: str) -> dict[str, list]:
    options = {"output_hidden_states": [True, False], "return_dict": [True, False], "output_attentions": [True]}
    if family != "bert":
        options["use_cache"] = [False]
    if family in ("mixtral", "qwen2_moe"):
        options["output_router_logits"] = [True]
    return options


@functools.lru_cache(maxsize=None)
def traced_family(family: str, options: tuple):
    model = tiny_model(family, layers=4)
    if dict(options).get("output_attentions"):
        model.config._attn_implementation = "eager"  # sdpa returns no attention weights
    call = {**example_inputs(family), **dict(options)}
    return model, call, lorp_fx.trace(model, call)


ABSENT = "absent"


@st.composite
def family_calls(draw, family: str):
    """Each option of the family: left out, or one of its values; and a random source for the removal set."""
    chosen = {name: draw(st.sampled_from([ABSENT, *values])) for name, values in sorted(family_options(family).items())}
    options = tuple((name, value) for name, value in chosen.items() if value != ABSENT)
    return options, draw(st.randoms(use_true_random=False))


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=2)
@given(data=st.data())
def test_pruned_transformer_called_like_the_trace_equals_eager_deletion(family, data):
    options, random = data.draw(family_calls(family))
    model, call, gm = traced_family(family, options)
    layers = lorp_fx.find_blocks(gm)
    removable = [b.name for b in layers if b.removable]
    if not removable:  # router logits feed aux_loss: the error names the output and the option
        named = "aux_loss.*" if call.get("return_dict", True) else "output.0.*"  # a tuple output has no names
        with pytest.raises(lorp_fx.NotRemovableError, match=named + "trace again with output_router_logits=False"):
            lorp_fx.prune(gm, [layers[0].name])
        return
    most = min(2, len(removable), len(layers) - 2)  # the budget rule keeps two layers
    remove = sorted(random.sample(removable, random.randint(1, most)))
    pruned = lorp_fx.prune(gm, remove)
    eager_model = eager_without(model, remove)
    eager_call = dict(call) if family == "bert" else {**call, "use_cache": False}  # the graph's own choice
    with torch.no_grad():
        mine, original = pruned(**call), gm(**call)
        eager = eager_model(**eager_call)
        keys = list(eager_model(**{**eager_call, "return_dict": True}).keys())
    assert structure(mine) == structure(original)

    def slots(name: str) -> set[int]:
        streams = layer_lists(model)
        path = next(iter(streams))
        if len(streams) > 1:  # T5: an encoder and a decoder stream
            path = "encoder.block" if name.startswith("encoder") else "decoder.block"
        indices = {int(n.rsplit(".", 1)[1]) for n in remove if n.rsplit(".", 1)[0] == path}
        if name.endswith("router_logits"):  # one slot per routed layer: dense layers (mlp_only_layers) have none
            routed = [i for i, layer in enumerate(streams[path]) if any(n.endswith("experts") for n, _ in layer.named_modules())]
            return {routed.index(i) for i in indices if i in routed}
        return indices

    assert_equals_eager(named_parts(mine, keys), named_parts(eager, keys), slots)
