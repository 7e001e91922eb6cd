"""Checkpoint surgery: layer and sublayer removal on tiny random models of every family, reloading, generating."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tiny_models import (
    REMOVALS,
    TINY,
    eager_without,
    example_inputs,
    tiny_model,
    tiny_tokenizer,
)
from torch import nn

from lorp_fx.arch.families import layer_stacks, sublayers
from lorp_fx.arch.surgery import count_parameters, remove_layers
from lorp_fx.core.errors import (
    BudgetError,
    NoResidualBlocksError,
    NotRemovableError,
    UnknownBlockError,
)
from lorp_fx.core.plan import PruningPlan
from lorp_fx.io.checkpoint import save_pretrained_atomic

GENERATIVE = [name for name in REMOVALS if name != "bert"]


def build(name: str, seed: int = 0):
    return tiny_model(name, seed=seed), TINY[name].auto, REMOVALS[name]


def prune(model, removals):
    return remove_layers(model, removals).model


def inputs(name: str, batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    return example_inputs(name, batch=batch, seq=length)


@torch.no_grad()
def logits(model, name: str) -> torch.Tensor:
    # No KV cache: the hand-made reference keeps stale layer indices.
    extra = {} if name == "bert" else {"use_cache": False}
    return model(**inputs(name), **extra).logits


def layer_count(model, name: str) -> list[int]:
    return [len(layers) for _, layers in layer_stacks(model)]


# --------------------------------------------------------------------------- discovery


@pytest.mark.parametrize(
    "name, expected",
    [
        ("llama", [("model.layers", 5)]),
        ("gemma3", [("model.layers", 5)]),
        ("gpt2", [("transformer.h", 5)]),
        ("qwen2_moe", [("model.layers", 6)]),
        ("t5", [("encoder.block", 5), ("decoder.block", 4)]),
        ("bert", [("bert.encoder.layer", 4)]),
    ],
)
def test_layer_stacks(name, expected):
    model, _, _ = build(name)
    assert [(path, len(layers)) for path, layers in layer_stacks(model)] == expected


def test_layer_stacks_of_bare_bert_model():
    config = TINY["bert"].config(4)
    assert [(p, len(m)) for p, m in layer_stacks(transformers.BertModel(config))] == [("encoder.layer", 4)]


def test_layer_stacks_falls_back_to_family_paths_without_a_count():
    model, _, _ = build("llama")
    del model.config.num_hidden_layers  # the generic discovery has no count to match
    assert [p for p, _ in layer_stacks(model)] == ["model.layers"]


def test_layer_stacks_error_on_a_model_without_layers():
    with pytest.raises(NoResidualBlocksError, match="no residual-layer list"):
        layer_stacks(nn.Sequential(nn.Linear(2, 2)))


def test_sublayer_names_per_family():
    llama = build("llama")[0]
    assert set(sublayers(llama, llama.model.layers[0])) == {"self_attn", "mlp"}
    gpt2 = build("gpt2")[0]
    assert set(sublayers(gpt2, gpt2.transformer.h[0])) == {"attn", "mlp"}
    t5 = build("t5")[0]
    assert set(sublayers(t5, t5.encoder.block[0])) == {"layer.0", "layer.1"}
    assert set(sublayers(t5, t5.decoder.block[0])) == {"layer.0", "layer.1", "layer.2"}
    bert = build("bert")[0]
    assert sublayers(bert, bert.bert.encoder.layer[0]) == {}


# --------------------------------------------------------------------------- layer removal, per family


@pytest.mark.numeric
@pytest.mark.parametrize("name", list(REMOVALS))
def test_remove_layers_matches_hand_made_reference(name):
    model, _, removals = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_before = model.config.to_dict()

    pruned = prune(model, removals)

    expected = logits(eager_without(model, removals), name)
    assert (logits(pruned, name) - expected).abs().max() < 1e-5
    assert (logits(model, name) - expected).abs().max() > 1e-3, "the removed layers should matter"
    # The input model is untouched.
    assert model.config.to_dict() == config_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(layer_count(model, name)) - sum(layer_count(pruned, name)) == len(removals)


@pytest.mark.parametrize("name", list(REMOVALS))
def test_layer_indices_and_config_follow_the_removal(name):
    model, _, removals = build(name)
    pruned = prune(model, removals)
    for path, layers in layer_stacks(pruned):
        for position, layer in enumerate(layers):
            indices = {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}
            assert indices <= {position}, f"{path}.{position} still has layer_idx {indices}"
        owner = pruned.get_submodule(path.rpartition(".")[0]) if "." in path else pruned
        config = getattr(owner, "config", pruned.config)
        assert config.num_hidden_layers == len(layers)
        if getattr(config, "layer_types", None) is not None:
            assert len(config.layer_types) == len(layers)


def test_t5_top_config_counts_both_stacks():
    model, _, removals = build("t5")
    pruned = prune(model, removals)
    assert (pruned.config.num_layers, pruned.config.num_decoder_layers) == (4, 3)
    assert (pruned.encoder.config.num_layers, pruned.decoder.config.num_layers) == (4, 3)


def test_gemma3_and_qwen3_keep_each_layers_attention_kind():
    for name in ("gemma3", "qwen3"):
        model, _, removals = build(name)
        pruned = prune(model, removals)
        kept = [i for i in range(model.config.num_hidden_layers) if f"model.layers.{i}" not in removals]
        assert pruned.config.layer_types == [model.config.layer_types[i] for i in kept]
        sliding = [layer.self_attn.sliding_window for layer in pruned.model.layers]
        assert sliding == [model.model.layers[i].self_attn.sliding_window for i in kept]


def _is_sparse(layer) -> bool:
    return hasattr(layer.mlp, "experts")


def test_qwen2_moe_layers_keep_their_kind_after_reload(tmp_path):
    model, auto, removals = build("qwen2_moe")
    assert [_is_sparse(layer) for layer in model.model.layers] == [False, True, False, False, False, True]
    pruned = prune(model, removals)
    save_pretrained_atomic(pruned, None, tmp_path / "out")
    reloaded = auto.from_pretrained(tmp_path / "out")
    # Kept: old layers 1, 2, 3, 5 -> sparse, dense, dense, sparse.
    assert [_is_sparse(layer) for layer in reloaded.model.layers] == [True, False, False, True]
    assert reloaded.config.decoder_sparse_step == 1 and reloaded.config.mlp_only_layers == [1, 2]


@pytest.mark.numeric
@pytest.mark.parametrize("name", list(REMOVALS))
def test_saved_checkpoint_reloads_with_same_logits(tmp_path, name):
    model, auto, removals = build(name)
    pruned = prune(model, removals)
    tokenizer = tiny_tokenizer()
    out = save_pretrained_atomic(pruned, tokenizer, tmp_path / "pruned")

    reloaded = auto.from_pretrained(out).eval()
    assert layer_count(reloaded, name) == layer_count(pruned, name)
    assert (logits(reloaded, name) - logits(pruned, name)).abs().max() < 1e-5
    # The tiny tokenizer's own class: AutoTokenizer would pick the family's (Qwen2Tokenizer for qwen2).
    reloaded_tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    assert reloaded_tokenizer("w1 w2 w3")["input_ids"] == tokenizer("w1 w2 w3")["input_ids"]


@pytest.mark.parametrize("name", GENERATIVE)
def test_reloaded_checkpoint_generates_with_and_without_cache(tmp_path, name):
    model, auto, removals = build(name)
    pruned = prune(model, removals)
    save_pretrained_atomic(pruned, tiny_tokenizer(), tmp_path / "pruned")
    reloaded = auto.from_pretrained(tmp_path / "pruned").eval()

    prompt = inputs(name, batch=1, length=6)["input_ids"]
    settings = dict(max_new_tokens=5, do_sample=False, min_new_tokens=5)
    with_cache = reloaded.generate(prompt, use_cache=True, **settings)
    without_cache = reloaded.generate(prompt, use_cache=False, **settings)
    in_memory = pruned.generate(prompt, use_cache=True, **settings)
    assert torch.equal(with_cache, without_cache)
    assert torch.equal(with_cache, in_memory)


def test_generation_without_renumbering_would_fail():
    """Why layer_idx is renumbered: a cache indexed by stale indices breaks generate."""
    model, _, removals = build("llama")
    broken = eager_without(model, removals)  # layer_idx left at 0, 3
    with pytest.raises((IndexError, RuntimeError, ValueError)):
        broken.generate(inputs("llama", 1)["input_ids"], max_new_tokens=3, do_sample=False, use_cache=True)


def test_heterogeneous_per_layer_overrides_follow_their_layers():
    model, _, _ = build("llama")
    # Set after construction: Llama's modules read the (then ambiguous) global value.
    model.config.per_layer_config = {2: {"rms_norm_eps": 1e-3}}
    pruned = prune(model, ["model.layers.1"])
    assert pruned.config.is_heterogeneous
    assert [c.rms_norm_eps for c in pruned.config.per_layer_config] == [1e-6, 1e-3, 1e-6, 1e-6]


def test_accepts_a_pruning_plan():
    model, _, removals = build("llama")
    pruned = prune(model, PruningPlan(remove=removals, method="manual"))
    assert len(pruned.model.layers) == 3


# --------------------------------------------------------------------------- sublayers


def _zero_output_hook(module, args, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


@pytest.mark.numeric
@pytest.mark.parametrize(
    "name, removals",
    [
        ("llama", ["model.layers.1.self_attn", "model.layers.2.mlp"]),
        ("gemma3", ["model.layers.0.self_attn", "model.layers.3.mlp"]),
        ("gpt2", ["transformer.h.1.attn", "transformer.h.3.mlp"]),
        ("mixtral", ["model.layers.1.mlp"]),
        ("qwen2_moe", ["model.layers.1.mlp", "model.layers.2.mlp", "model.layers.4.self_attn"]),
    ],
)
def test_sublayer_removal_equals_a_sublayer_that_outputs_zero(tmp_path, name, removals):
    model, auto, _ = build(name)
    pruned = prune(model, removals)

    reference = copy.deepcopy(model)
    for sub in removals:
        reference.get_submodule(sub).register_forward_hook(_zero_output_hook)
    assert (logits(pruned, name) - logits(reference, name)).abs().max() < 1e-6
    assert (logits(pruned, name) - logits(model, name)).abs().max() > 1e-3
    assert layer_count(pruned, name) == layer_count(model, name)  # parameters are kept
    assert count_parameters(pruned) == count_parameters(model)

    save_pretrained_atomic(pruned, None, tmp_path / "out")
    reloaded = auto.from_pretrained(tmp_path / "out").eval()
    assert (logits(reloaded, name) - logits(pruned, name)).abs().max() < 1e-5


def test_t5_sublayers_pass_the_residual_stream_through():
    model, _, _ = build("t5")
    removals = ["encoder.block.0.layer.0", "encoder.block.1.layer.1", "decoder.block.0.layer.1", "decoder.block.2.layer.2"]
    pruned = prune(model, removals)
    seen = {}
    for sub in removals:
        def hook(module, args, kwargs, output, sub=sub):
            seen[sub] = (args[0] if args else kwargs["hidden_states"], output[0] if isinstance(output, tuple) else output)
        pruned.get_submodule(sub).register_forward_hook(hook, with_kwargs=True)
    logits(pruned, "t5")
    for sub, (stream_in, stream_out) in seen.items():
        assert torch.equal(stream_in, stream_out), sub
    # The first block still computes the relative position bias the others reuse.
    assert pruned.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.abs().sum() > 0


@pytest.mark.numeric
def test_sublayers_of_a_removed_layer_are_ignored():
    model, _, _ = build("llama")
    pruned = prune(model, ["model.layers.1", "model.layers.1.mlp"])
    expected = logits(eager_without(model, ["model.layers.1"]), "llama")
    assert (logits(pruned, "llama") - expected).abs().max() < 1e-5


def test_bert_sublayers_are_refused_as_post_norm():
    model, _, _ = build("bert")
    with pytest.raises(NotRemovableError, match="post-norm"):
        remove_layers(model, ["bert.encoder.layer.1.attention"])


# --------------------------------------------------------------------------- errors


def test_unknown_names_list_the_valid_ones():
    model, _, _ = build("llama")
    with pytest.raises(UnknownBlockError) as info:
        remove_layers(model, ["model.layers.9", "layers.1"])
    message = str(info.value)
    assert "model.layers.9" in message and "'layers.1'" in message
    assert "model.layers.0 .. model.layers.4" in message and "self_attn" in message


def test_removing_every_layer_is_refused():
    model, _, _ = build("llama")
    with pytest.raises(BudgetError, match="all 5 layers"):
        remove_layers(model, [f"model.layers.{i}" for i in range(5)])


@pytest.mark.parametrize("block", ["encoder.block.0", "decoder.block.0"])
def test_t5_first_block_is_not_removable(block):
    model, _, _ = build("t5")
    with pytest.raises(NotRemovableError, match="relative position bias"):
        remove_layers(model, [block])


# --------------------------------------------------------------------------- parameters


def test_count_parameters_counts_tied_weights_once():
    model, _, removals = build("gpt2")  # lm_head is tied to the token embedding
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    untied = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    assert count_parameters(model) == untied - model.lm_head.weight.numel()

    pruned = prune(model, removals)
    layer_size = sum(p.numel() for p in model.transformer.h[2].parameters())
    assert count_parameters(model) - count_parameters(pruned) == layer_size


def test_count_parameters_counts_shared_storage_once():
    first, second = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    second.weight = nn.Parameter(first.weight.data)  # a different Parameter over the same tensor
    assert count_parameters(nn.Sequential(first, second)) == 16


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_pruned_checkpoint_reloads_and_generates(tmp_path, smollm2):
    model, tokenizer = smollm2  # the session's one load (conftest.py)
    assert len(model.model.layers) == 30 and not model.training
    pruned = prune(model, ["model.layers.13", "model.layers.14"])
    assert len(model.model.layers) == 30 and pruned.config.num_hidden_layers == 28
    out = save_pretrained_atomic(pruned, tokenizer, tmp_path / "smollm2-pruned")

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 28
    prompt = reloaded_tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert prompt.tolist() == tokenizer("The capital of France is", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert (reloaded(prompt).logits - pruned(prompt).logits).abs().max() < 1e-5
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    generated = reloaded.generate(prompt, use_cache=True, **settings)
    assert torch.equal(generated, reloaded.generate(prompt, use_cache=False, **settings))
    assert generated.shape[1] == prompt.shape[1] + 8
    assert reloaded_tokenizer.decode(generated[0, prompt.shape[1]:]).strip()
