"""The traced and the pruned graph take every call the model took, and survive what users do with modules."""

import copy
import io
import os
import shutil

import pytest
import torch
from tiny_models import eager_without, example_inputs, tiny_model
from torch import nn
from torch.export import Dim
from torch.fx.passes.infra.pass_manager import PassManager

import lorp_fx
from lorp_fx.core.errors import FixedArgumentError


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", layers=3)


@pytest.fixture(scope="module")
def ids():
    return example_inputs("llama")["input_ids"]


@pytest.fixture(scope="module")
def traced(llama, ids):
    """Traced the way a user would: tensors plus fixed options, use_cache left to lorp-fx."""
    return lorp_fx.trace(llama, {"input_ids": ids, "return_dict": True})


def logits_of(output):
    return output.logits if hasattr(output, "logits") else output[0]


# --------------------------------------------------------------------------- fixed arguments


def test_the_graph_takes_the_calls_the_model_takes(llama, ids, traced):
    reference = llama(input_ids=ids, use_cache=False).logits
    calls = [
        lambda g: g(ids),
        lambda g: g(input_ids=ids),
        lambda g: g(ids, use_cache=False),
        lambda g: g(input_ids=ids, use_cache=False, return_dict=True),
        lambda g: g(ids, None),  # attention_mask=None, positionally, as the model allows
        lambda g: g(ids, attention_mask=None, labels=None),
        lambda g: g(ids, output_hidden_states=False),  # the config's value: the same call
    ]
    pruned = lorp_fx.prune(traced, ["model.layers.1"])
    eager = eager_without(llama, ["model.layers.1"])(input_ids=ids, use_cache=False).logits
    for call in calls:
        torch.testing.assert_close(call(traced).logits, reference, atol=0, rtol=0)
        torch.testing.assert_close(call(pruned).logits, eager, atol=0, rtol=0)


def test_a_changed_fixed_argument_names_it_and_its_traced_value(traced, ids):
    for graph in (traced, lorp_fx.prune(traced, ["model.layers.0"])):
        with pytest.raises(FixedArgumentError) as caught:
            graph(input_ids=ids, return_dict=False)
        message = str(caught.value)
        assert isinstance(caught.value, lorp_fx.LoRPError) and "\n" not in message
        assert "return_dict=False" in message and "traced with return_dict=True" in message
        assert "trace again with return_dict=False" in message


def test_arguments_the_trace_did_not_use_must_keep_their_default(traced, ids):
    with pytest.raises(FixedArgumentError, match="labels.*trace again with a tensor for labels"):
        traced(ids, labels=ids)
    with pytest.raises(FixedArgumentError, match="output_attentions=True was not passed"):
        traced(ids, output_attentions=True)
    with pytest.raises(TypeError, match="positional"):
        traced(ids, None, None, None, None, None, False, 0, "one too many")
    with pytest.raises(lorp_fx.InputMismatchError, match="missing input 'input_ids'"):
        traced(attention_mask=None)


def test_trace_picks_use_cache_false_for_transformers_and_says_so(traced, ids):
    for graph in (traced, lorp_fx.prune(traced, ["model.layers.2"])):
        assert graph.meta["lorp_fx_fixed_arguments"] == {"return_dict": True, "use_cache": False}
        assert "cache" in graph.meta["lorp_fx_chosen_arguments"]["use_cache"]
        with pytest.raises(FixedArgumentError, match="use_cache=True.*traced with use_cache=False.*KV cache"):
            graph(ids, use_cache=True)


def test_a_cache_that_cannot_be_traced_points_at_use_cache(llama, ids):
    with pytest.raises(lorp_fx.TraceError, match="pass use_cache=False in example_inputs"):
        lorp_fx.trace(llama, {"input_ids": ids, "use_cache": True})


def test_positional_example_inputs_give_a_graph_called_positionally(llama, ids):
    gm = lorp_fx.trace(llama, (ids,))
    torch.testing.assert_close(gm(ids).logits, llama(ids, use_cache=False).logits, atol=0, rtol=0)
    torch.testing.assert_close(gm(input_ids=ids).logits, llama(ids, use_cache=False).logits, atol=0, rtol=0)


# --------------------------------------------------------------------------- the module lifecycle


def test_graphs_survive_torch_save_and_load(traced, ids):
    pruned = lorp_fx.prune(traced, ["model.layers.1"])
    for graph in (traced, pruned):
        buffer = io.BytesIO()
        torch.save(graph, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(loaded(ids).logits, graph(ids).logits, atol=0, rtol=0)
        assert [b.name for b in lorp_fx.find_blocks(loaded)] == [b.name for b in lorp_fx.find_blocks(graph)]
        assert loaded.meta == graph.meta
        with pytest.raises(FixedArgumentError):
            loaded(ids, use_cache=True)
    # a loaded graph prunes like the original
    loaded = torch.load(_saved(traced), weights_only=False)
    torch.testing.assert_close(lorp_fx.prune(loaded, ["model.layers.1"])(ids).logits, pruned(ids).logits, atol=0, rtol=0)


def _saved(module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return buffer


def test_graphs_survive_deepcopy_eval_and_train(traced, ids):
    pruned = lorp_fx.prune(traced, ["model.layers.0"])
    copied = copy.deepcopy(pruned)
    copied.train()
    assert copied.training and all(m.training for m in copied.modules())
    copied.eval()
    torch.testing.assert_close(copied(ids, use_cache=False).logits, pruned(ids).logits, atol=0, rtol=0)
    with pytest.raises(FixedArgumentError):
        copied(ids, return_dict=False)


class _Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.linear(self.norm(x)))


class _Residual(nn.Module):
    def __init__(self, depth=4, width=8):
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_a_symbolically_traced_graph_survives_torch_save_too():
    torch.manual_seed(0)
    model, x = _Residual().eval(), torch.randn(2, 5, 3)
    pruned = lorp_fx.prune(lorp_fx.trace(model), ["blocks.1"])
    loaded = torch.load(_saved(pruned), weights_only=False)
    torch.testing.assert_close(loaded(x), pruned(x), atol=0, rtol=0)
    assert [b.name for b in lorp_fx.find_blocks(loaded)] == ["blocks.0", "blocks.2", "blocks.3"]


# --------------------------------------------------------------------------- extra outputs


def test_hidden_states_keep_one_slot_per_layer(llama, ids):
    call = {"input_ids": ids, "output_hidden_states": True}
    gm = lorp_fx.trace(llama, call)
    assert all(b.removable for b in lorp_fx.find_blocks(gm))
    pruned = lorp_fx.prune(gm, ["model.layers.1"])
    states = pruned(**call).hidden_states
    eager = eager_without(llama, ["model.layers.1"])(**call, use_cache=False).hidden_states
    assert len(states) == len(gm(**call).hidden_states) == 4 and len(eager) == 3
    torch.testing.assert_close(states[1], states[2], atol=0, rtol=0)  # the removed layer passes its input on
    for mine, theirs in zip([s for i, s in enumerate(states) if i != 1], eager):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


def test_attention_weights_of_a_removed_layer_are_none(ids):
    model = tiny_model("llama", layers=3)
    model.config._attn_implementation = "eager"
    call = {"input_ids": ids, "output_attentions": True}
    pruned = lorp_fx.prune(lorp_fx.trace(model, call), ["model.layers.2"])
    weights = pruned(**call).attentions
    eager = eager_without(model, ["model.layers.2"])(**call, use_cache=False).attentions
    assert len(weights) == 3 and weights[2] is None
    for mine, theirs in zip(weights[:2], eager):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


def test_router_logits_of_a_moe_model_keep_their_slots(ids):
    base = tiny_model("mixtral", layers=3).model
    call = {"input_ids": ids, "output_router_logits": True}
    pruned = lorp_fx.prune(lorp_fx.trace(base, call), ["layers.0"])
    logits = pruned(**call).router_logits
    assert len(logits) == 3 and logits[0] is None and logits[1].shape == logits[2].shape


def test_an_output_that_cannot_be_kept_is_named_with_its_option(ids):
    model = tiny_model("mixtral", layers=3)
    gm = lorp_fx.trace(model, {"input_ids": ids, "output_router_logits": True})
    with pytest.raises(lorp_fx.NotRemovableError) as caught:
        lorp_fx.prune(gm, ["model.layers.1"])
    message = str(caught.value)
    assert "aux_loss" in message and "output_router_logits=True" in message
    assert "trace again with output_router_logits=False" in message and "\n" not in message


# --------------------------------------------------------------------------- compiler pass


def test_prune_blocks_is_idempotent_in_a_pass_manager(traced, ids):
    manager = PassManager([lorp_fx.PruneBlocks(["model.layers.1"])], steps=2)
    result = manager(traced)
    assert result.modified
    assert [b.name for b in lorp_fx.find_blocks(result.graph_module)] == ["model.layers.0", "model.layers.2"]
    torch.testing.assert_close(result.graph_module(ids).logits, lorp_fx.prune(traced, ["model.layers.1"])(ids).logits)
    again = manager(result.graph_module)
    assert not again.modified and again.graph_module is result.graph_module
    with pytest.raises(lorp_fx.UnknownBlockError, match="already removed"):
        lorp_fx.prune(result.graph_module, ["model.layers.1"])


def _exported_llama(llama, ids):
    return torch.export.export(
        llama, (), {"input_ids": ids, "use_cache": False},
        dynamic_shapes={"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "use_cache": None}, strict=False,
    )


def test_prune_takes_an_exported_program_and_gives_one_back(llama, ids, tmp_path):
    program = _exported_llama(llama, ids)
    pruned = lorp_fx.prune(program, ["model.layers.1"])
    assert isinstance(pruned, torch.export.ExportedProgram)
    assert not any(".layers.1." in key for key in pruned.state_dict)
    assert len(pruned.state_dict) < len(program.state_dict) and len(program.state_dict) == len(llama.state_dict())
    signature_targets = {s.target for s in pruned.graph_signature.input_specs if s.target}
    assert signature_targets == set(pruned.state_dict) | set(pruned.constants)
    eager = eager_without(llama, ["model.layers.1"])(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(pruned.module()(input_ids=ids, use_cache=False).logits, eager)
    torch.export.save(pruned, tmp_path / "pruned.pt2")
    loaded = torch.export.load(tmp_path / "pruned.pt2")
    torch.testing.assert_close(loaded.module()(input_ids=ids, use_cache=False).logits, eager)
    other = torch.randint(2, 90, (3, 5))  # another batch size and length: the shapes stay dynamic
    torch.testing.assert_close(
        loaded.module()(input_ids=other, use_cache=False).logits,
        eager_without(llama, ["model.layers.1"])(input_ids=other, use_cache=False).logits,
    )


def test_an_exported_plain_network_prunes_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model, x = _Residual().eval(), torch.randn(2, 5, 3)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
    pruned = lorp_fx.prune(program, ["blocks.0", "blocks.2"])
    reference = copy.deepcopy(model)
    reference.blocks = nn.ModuleList([model.blocks[1], model.blocks[3]])
    torch.export.save(pruned, tmp_path / "mlp.pt2")
    torch.testing.assert_close(torch.export.load(tmp_path / "mlp.pt2").module()(x), reference(x))
    assert sum(v.numel() for v in pruned.state_dict.values()) == sum(p.numel() for p in reference.parameters())


class _GatedBlock(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        gate = torch.sigmoid(self.linear(x))
        return x + gate * x, gate


class _Gated(nn.Module):
    """Returns each block's gate: a value only that block computes."""

    def __init__(self, depth=3, width=8):
        super().__init__()
        self.inp, self.head = nn.Linear(3, width), nn.Linear(width, 2)
        self.blocks = nn.ModuleList(_GatedBlock(width) for _ in range(depth))

    def forward(self, x):
        h, gates = self.inp(x), []
        for block in self.blocks:
            h, gate = block(h)
            gates.append(gate)
        return self.head(h), tuple(gates)


def test_a_removed_blocks_own_output_is_none_in_an_exported_program_too(tmp_path):
    torch.manual_seed(0)
    model, x = _Gated().eval(), torch.randn(2, 4, 3)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim.AUTO},))
    assert [b.name for b in lorp_fx.find_blocks(program)] == ["blocks.0", "blocks.1", "blocks.2"]
    pruned = lorp_fx.prune(program, ["blocks.1"])
    pruned.validate()
    torch.export.save(pruned, tmp_path / "gated.pt2")
    logits, gates = torch.export.load(tmp_path / "gated.pt2").module()(x)
    reference = copy.deepcopy(model)
    reference.blocks = nn.ModuleList([model.blocks[0], model.blocks[2]])
    expected_logits, expected_gates = reference(x)
    torch.testing.assert_close(logits, expected_logits)
    assert len(gates) == 3 and gates[1] is None
    torch.testing.assert_close([gates[0], gates[2]], list(expected_gates))


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("cc")


@pytest.mark.slow
@pytest.mark.skipif(_compiler() is None, reason="AOTInductor needs a C++ compiler (g++/c++/cc) on PATH")
def test_aot_inductor_runs_the_pruned_program(llama, ids, tmp_path):
    """About 30 s on two cores: AOTInductor compiles the pruned tiny Llama to C++."""
    pruned = lorp_fx.prune(_exported_llama(llama, ids), ["model.layers.1"])
    package = torch._inductor.aoti_compile_and_package(pruned, package_path=str(tmp_path / "pruned_aoti.pt2"))
    runner = torch._inductor.aoti_load_package(package)
    eager = eager_without(llama, ["model.layers.1"])
    for batch in (ids, torch.randint(2, 90, (3, 4))):
        with torch.no_grad():
            torch.testing.assert_close(
                runner(input_ids=batch, use_cache=False).logits, eager(input_ids=batch, use_cache=False).logits
            )
