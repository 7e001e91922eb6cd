"""Statistics read by module hooks are the graph observer's: same points, same names, same numbers."""

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, VOCAB, example_inputs, tiny_model, tiny_tokenizer

from lorp_fx.calibration.graph_observer import collect_statistics
from lorp_fx.calibration.hook_observer import HookObserver, collect_hook_statistics
from lorp_fx.calibration.sampling import self_calibration
from lorp_fx.graph.blocks import find_blocks

PRE_NORM = ["llama", "qwen3", "gemma3", "gpt2", "mixtral", "qwen2_moe"]


def padded_batches(family: str) -> list[dict]:
    batches = []
    for seed in (1, 2):
        batch = example_inputs(family, batch=3, seq=9, seed=seed)
        mask = torch.ones_like(batch["input_ids"])
        mask[1, 6:] = 0  # padding the statistics must skip
        batch["attention_mask"] = mask
        batches.append(batch)
    return batches


def assert_same_statistics(hooked, graph, atol=1e-6):
    assert hooked.points == graph.points
    assert hooked.blocks == graph.blocks and hooked.block_points == graph.block_points
    assert hooked.removable == graph.removable and hooked.block_kinds == graph.block_kinds
    assert (hooked.token_count, hooked.sequence_count) == (graph.token_count, graph.sequence_count)
    for name in ("similarity", "angular", "last_token_angular"):
        np.testing.assert_allclose(getattr(hooked, name), getattr(graph, name), atol=atol, err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_statistics_from_hooks_match_the_graph_observer(family):
    model = tiny_model(family)
    batches = padded_batches(family)
    graph_stats, graph = collect_statistics(model, batches, progress=False)
    hooked = collect_hook_statistics(model, find_blocks(graph, "layer"), batches, progress=False)
    assert_same_statistics(hooked, graph_stats)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_sublayer_statistics_from_hooks_match_the_graph_observer(family):
    model = tiny_model(family)
    batches = padded_batches(family)
    graph_stats, graph = collect_statistics(model, batches, granularity="sublayer", progress=False)
    hooked = collect_hook_statistics(model, find_blocks(graph, "sublayer"), batches, granularity="sublayer", progress=False)
    assert_same_statistics(hooked, graph_stats)


def test_a_pass_stops_at_the_last_point():
    model = tiny_model("llama")
    calls = []
    model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    _, graph = collect_statistics(tiny_model("llama"), padded_batches("llama")[:1], progress=False)
    collect_hook_statistics(model, find_blocks(graph, "layer"), padded_batches("llama"), progress=False)
    assert not calls  # the output head never ran


def test_statistics_gathered_while_sampling_are_those_of_the_sampled_windows():
    """Watching self-calibration's steps (one token at a time, KV cache) gives the statistics of a
    full pass over the windows it returns."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    _, graph = collect_statistics(model, padded_batches("llama")[:1], progress=False)
    blocks = find_blocks(graph, "layer")
    observer = HookObserver(model, blocks)
    with observer.attached():
        windows = self_calibration(model, tokenizer, 5, 10, batch_size=3, progress=False,
                                   after_step=lambda last: observer.add(last_tokens=last))
    full = collect_hook_statistics(model, blocks, [{"input_ids": windows}], progress=False)
    assert_same_statistics(observer.statistics(), full, atol=1e-5)
    assert windows.max() < VOCAB


@pytest.mark.parametrize("reader", ["graph", "hooks"])
def test_a_nan_in_the_stream_names_the_block_where_it_first_appears(reader):
    import lorp_fx

    model = tiny_model("llama", layers=4)
    batches = padded_batches("llama")
    _, graph = collect_statistics(model, batches, progress=False)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(lorp_fx.CalibrationError, match="first at the output of model.layers.2; check the model's dtype"):
        if reader == "graph":
            collect_statistics(model, batches, progress=False)
        else:
            collect_hook_statistics(model, find_blocks(graph, "layer"), batches, progress=False)
