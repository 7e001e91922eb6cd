"""The suite's export memo (tests/export_cache.py) answers as torch.export does, and only where it may."""

import pytest
import torch
from tiny_models import tiny_model, trace_inputs

import export_cache
from lorp_fx import trace

pytestmark = pytest.mark.skipif(not export_cache.enabled(), reason="the export memo is off (LORP_FX_TEST_EXPORT_CACHE=0)")


@pytest.fixture
def export_counts(monkeypatch):
    """The memo's counts from now on, with an empty memo (what earlier tests exported is not seen)."""
    monkeypatch.setattr(export_cache, "_memo", {})
    before = dict(export_cache.counts)
    return lambda: {k: export_cache.counts[k] - before[k] for k in before}


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_a_memoised_graph_is_a_fresh_export_bound_to_the_current_weights(family, export_counts):
    first, second = tiny_model(family), tiny_model(family, seed=3)  # the same tree, other weights
    inputs = trace_inputs(family)
    gm_first = trace(first, inputs)
    gm_second = trace(second, inputs)
    assert export_counts() == {"hits": 1, "misses": 1, "skipped": 0}
    assert str(gm_first.graph) == str(gm_second.graph)
    # The graph shares the weights of the model it was traced from, as a fresh export's does.
    second_weights = {id(p) for p in second.parameters()}
    assert {id(p) for p in gm_second.parameters()} <= second_weights
    assert not {id(p) for p in gm_second.parameters()} & {id(p) for p in first.parameters()}
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(1.5)
        expected = second(**inputs)
        got = gm_second(**inputs)
    expected = expected.logits if hasattr(expected, "logits") else expected[0]
    got = got.logits if hasattr(got, "logits") else got[0]
    torch.testing.assert_close(got, expected)


def test_other_weights_and_input_values_share_a_graph_that_computes_with_them(export_counts):
    """Export traces with fake tensors: the graph is the same for other values, and the memo binds the new weights."""
    inputs, other_inputs = trace_inputs("llama"), trace_inputs("llama", seed=5)
    trace(tiny_model("llama"), inputs)
    other = tiny_model("llama", seed=1)
    gm = trace(other, other_inputs)
    assert export_counts() == {"hits": 1, "misses": 1, "skipped": 0}
    with torch.no_grad():
        torch.testing.assert_close(gm(**other_inputs).logits, other(**other_inputs).logits)


def test_another_tree_other_shapes_or_patched_code_miss_the_memo(export_counts):
    inputs = trace_inputs("llama")
    trace(tiny_model("llama"), inputs)
    trace(tiny_model("llama", layers=3), inputs)  # another tree
    trace(tiny_model("llama"), trace_inputs("llama", seq=9))  # other input shapes
    trace(tiny_model("llama"), {**inputs, "output_attentions": True})  # another fixed argument
    assert export_counts() == {"hits": 0, "misses": 4, "skipped": 0}
    patched = tiny_model("llama")
    patched.model.layers[0].forward = patched.model.layers[0].forward  # a forward of the instance's own
    trace(patched, inputs)
    assert export_counts()["skipped"] == 1
    handle = tiny_model("llama")
    handle.model.layers[0].register_forward_hook(lambda *a: None)
    trace(handle, inputs)
    assert export_counts()["skipped"] == 2
