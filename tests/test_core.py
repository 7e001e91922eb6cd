"""trace -> find_blocks -> prune on every supported family (tiny random weights)."""

import copy
import ctypes
import subprocess
import sys

import pytest
import torch
from tiny_models import (
    FAMILIES,
    eager_without,
    example_inputs,
    layer_names,
    logits,
    tiny_model,
    trace_inputs,
)
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

import lorp_fx

EXPECTED_SUBLAYER_KINDS = {
    "llama": ["attention", "mlp"],
    "qwen3": ["attention", "mlp"],
    "gemma3": ["attention", "mlp"],
    "gpt2": ["attention", "mlp"],
    "bert": ["attention", "mlp"],
    "mixtral": ["attention", "mlp"],
    "qwen2_moe": ["attention", "mlp"],
}


@pytest.fixture(scope="module", params=FAMILIES)
def traced(request):
    family = request.param
    model = tiny_model(family)
    return family, model, lorp_fx.trace(model, trace_inputs(family))


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_layers_are_found_in_order_with_their_names(traced):
    family, model, gm = traced
    blocks = lorp_fx.find_blocks(gm, granularity="layer")
    assert [b.name for b in blocks] == layer_names(model)
    assert [b.index for b in blocks] == list(range(len(blocks)))
    assert all(b.kind == "layer" for b in blocks)
    for block in blocks:
        assert block.entry in block.exit.all_input_nodes or block.nodes, block


def test_sublayers_are_attention_and_mlp(traced):
    family, model, gm = traced
    blocks = lorp_fx.find_blocks(gm, granularity="sublayer")
    kinds = [b.kind for b in blocks]
    if family == "t5":
        encoder = model.config.num_layers
        assert kinds[: 2 * encoder] == ["attention", "mlp"] * encoder
        assert kinds[2 * encoder :] == ["attention", "cross_attention", "mlp"] * model.config.num_decoder_layers
    else:
        assert kinds == EXPECTED_SUBLAYER_KINDS[family] * len(layer_names(model))
    names = [b.name for b in blocks]
    assert len(set(names)) == len(names)
    layers = layer_names(model)
    assert all(any(n.startswith(layer + ".") or n.startswith(layer + ":") for layer in layers) for n in names)


def removal_sets(family, model, gm):
    removable = [b.name for b in lorp_fx.find_blocks(gm) if b.removable]
    return [removable[1:2], removable[-1:], removable[::2][: max(1, len(removable) - 1)]]


def test_pruned_graph_equals_eager_model_without_those_layers(traced):
    family, model, gm = traced
    inputs = example_inputs(family, batch=3, seq=9, seed=5)  # other sizes than traced with
    for remove in removal_sets(family, model, gm):
        pruned = lorp_fx.prune(gm, remove)
        reference = eager_without(model, remove)
        with torch.no_grad():
            expected = logits(reference(**inputs, **({} if family == "bert" else {"use_cache": False})))
            got = logits(pruned(**inputs))
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() < 1e-4, remove
        assert n_params(gm) - n_params(pruned) == n_params(model) - n_params(reference)
        assert len(lorp_fx.find_blocks(pruned)) == len(lorp_fx.find_blocks(gm)) - len(remove)


def test_prune_leaves_its_input_untouched(traced):
    family, model, gm = traced
    inputs = example_inputs(family)
    code, params = gm.code, n_params(gm)
    with torch.no_grad():
        before = logits(gm(**inputs)).clone()
        lorp_fx.prune(gm, removal_sets(family, model, gm)[0])
        after = logits(gm(**inputs))
    assert gm.code == code and n_params(gm) == params
    assert torch.equal(before, after)


def test_sublayer_pruning_matches_zeroed_sublayer(traced):
    family, model, gm = traced
    if family in ("bert",):
        pytest.skip("post-norm: removing a sublayer also skips its norm, which no zeroed weight reproduces")
    sub = [b for b in lorp_fx.find_blocks(gm, "sublayer") if b.removable and b.kind == "attention"][-1]
    pruned = lorp_fx.prune(gm, [sub.name])
    reference = copy.deepcopy(model)
    # A sublayer that adds zero: zero the last linear of its branch.
    module = reference.get_submodule(sub.name) if ":" not in sub.name else None
    assert module is not None, sub.name
    last_linear = [m for m in module.modules() if isinstance(m, (nn.Linear,)) or type(m).__name__ == "Conv1D"][-1]
    with torch.no_grad():
        last_linear.weight.zero_()
        if getattr(last_linear, "bias", None) is not None:
            last_linear.bias.zero_()
    inputs = example_inputs(family)
    with torch.no_grad():
        expected = logits(reference(**inputs, use_cache=False))
        got = logits(pruned(**inputs))
    assert (got - expected).abs().max().item() < 1e-4


def test_the_graph_module_works_where_lightning_needs_it(traced):
    family, model, gm = traced
    gm.train()
    gm.eval()
    assert not gm.training
    inputs = example_inputs(family, batch=1, seq=5)
    with torch.no_grad():
        assert logits(gm(**inputs)).shape[:2] == inputs["input_ids"].shape or family == "t5"


def test_prune_as_an_fx_pass(traced):
    family, model, gm = traced
    remove = removal_sets(family, model, gm)[0]
    result = lorp_fx.PruneBlocks(remove)(gm)
    assert isinstance(result, PassResult) and result.modified
    assert len(lorp_fx.find_blocks(result.graph_module)) == len(lorp_fx.find_blocks(gm)) - 1
    assert not lorp_fx.PruneBlocks([], allow_empty=True)(gm).modified
    with pytest.raises(lorp_fx.PlanError, match="names no block"):
        lorp_fx.PruneBlocks([])


def test_prune_accepts_a_plan(traced):
    family, model, gm = traced
    remove = removal_sets(family, model, gm)[1]
    plan = lorp_fx.PruningPlan(remove=remove, method="manual")
    inputs = example_inputs(family)
    with torch.no_grad():
        assert torch.equal(logits(lorp_fx.prune(gm, plan)(**inputs)), logits(lorp_fx.prune(gm, remove)(**inputs)))


# ----------------------------------------------------------------------------- T5's shared position bias


def test_t5_first_blocks_are_not_removable_and_say_why():
    model = tiny_model("t5")
    gm = lorp_fx.trace(model, trace_inputs("t5"))
    blocks = {b.name: b for b in lorp_fx.find_blocks(gm)}
    assert not blocks["encoder.block.0"].removable and not blocks["decoder.block.0"].removable
    assert "encoder.block.1" in blocks["encoder.block.0"].reason
    assert all(b.removable for name, b in blocks.items() if not name.endswith("block.0"))
    with pytest.raises(lorp_fx.NotRemovableError, match="encoder.block.0 cannot be removed"):
        lorp_fx.prune(gm, ["encoder.block.0"])


# ----------------------------------------------------------------------------- bad input


class NoResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + 1.0


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum().item() > 0:  # data-dependent: neither frontend can follow it
            return x + self.a(x)
        return x


def test_model_without_residual_blocks_is_refused():
    gm = lorp_fx.trace(NoResidual())
    with pytest.raises(lorp_fx.NoResidualBlocksError, match="no residual block"):
        lorp_fx.find_blocks(gm)


def test_unknown_block_name_lists_the_real_ones():
    model = tiny_model("llama")
    gm = lorp_fx.trace(model, trace_inputs("llama"))
    with pytest.raises(lorp_fx.UnknownBlockError, match="'model.layers.9'.*model.layers.0"):
        lorp_fx.prune(gm, ["model.layers.9"])


def test_the_budget_rule_holds_in_the_graph_pass():
    """The one rule of lorp_fx/budget.py: at least two blocks stay, and one in every stream."""
    gm = lorp_fx.trace(tiny_model("llama", layers=3), trace_inputs("llama"))
    with pytest.raises(lorp_fx.BudgetError, match="all 3 layer blocks"):
        lorp_fx.prune(gm, ["model.layers.0", "model.layers.1", "model.layers.2"])
    with pytest.raises(lorp_fx.BudgetError, match="at least 2 must stay"):
        lorp_fx.prune(gm, ["model.layers.0", "model.layers.1"])
    assert len(lorp_fx.find_blocks(lorp_fx.prune(gm, ["model.layers.1"]))) == 2


def test_a_single_string_is_refused():
    gm = lorp_fx.trace(tiny_model("llama", layers=2), trace_inputs("llama"))
    with pytest.raises(lorp_fx.CallError, match="remove=\\[name\\]"):
        lorp_fx.prune(gm, "model.layers.0")


def test_untraceable_model_names_both_frontends():
    with pytest.raises(lorp_fx.TraceError) as error:
        lorp_fx.trace(DataDependent(), (torch.randn(2, 4),))
    message = str(error.value)
    assert "symbolic_trace" in message and "export" in message and "example_inputs" in message


def test_example_inputs_that_do_not_fit_the_model():
    model = tiny_model("llama", layers=2)
    with pytest.raises(lorp_fx.TraceError, match="export"):
        lorp_fx.trace(model, {"input_ids": torch.randn(2, 5, 3), "use_cache": False})
    with pytest.raises(lorp_fx.InputMismatchError):
        lorp_fx.trace(NoResidual(), (torch.randn(2, 7),))


_HEAP_PROBE = """
import ctypes, sys
from lorp_fx.core.model import limit_heap_fragmentation

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "limited":
    assert limit_heap_fragmentation()
del bytearray(16 * 2**20)[:]  # a 16 MiB block freed: glibc's dynamic threshold rises to it
before = libc.mallinfo2().hblkhd
block = bytearray(6 * 2**20)
print(libc.mallinfo2().hblkhd - before >= 6 * 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_the_command_lines_process_gives_large_freed_blocks_back_at_once():
    """After `limit_heap_fragmentation` a block of 4 MiB or more has pages of its own (given back when freed), even
    after a larger block was freed; glibc's default would serve it from the heap, where freed holes stay resident."""
    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("a C library without glibc's mallinfo2")

    def mapped_on_its_own(mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    assert mapped_on_its_own("limited") == "True"
    assert mapped_on_its_own("default") == "False"  # the probe tells the two apart
