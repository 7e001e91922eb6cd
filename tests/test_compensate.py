"""Compensation (lorp_fx.compensation): exact folds per family, the fit, refusals, save/reload/generate."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import VOCAB, tiny_model, trace_inputs

import lorp_fx
from lorp_fx.arch import families
from lorp_fx.arch.surgery import count_parameters, remove_layers
from lorp_fx.compensation.fit import (
    Compensator,
    apply_compensation,
    compensate,
    fit_compensation,
)
from lorp_fx.compensation.solver import (
    FALLBACK_RIDGE,
    RIDGE_GRID,
    FoldedStatistics,
    GapStatistics,
)
from lorp_fx.core.errors import CompensationError, LoRPError
from lorp_fx.core.plan import PruningPlan
from lorp_fx.io.checkpoint import save_pretrained_atomic

# family -> removals: scattered runs, a run at the end of the stack, sublayers, both T5 stacks.
REMOVALS = {
    "llama": ["model.layers.1", "model.layers.3", "model.layers.4"],
    "qwen3": ["model.layers.2", "model.layers.3"],
    "mixtral": ["model.layers.2", "model.layers.4"],
    "qwen2_moe": ["model.layers.2", "model.layers.4", "model.layers.5"],  # folds into a sparse and a dense MLP
    "gpt2": ["transformer.h.1", "transformer.h.2", "transformer.h.4"],
    "t5": ["encoder.block.2", "encoder.block.3", "decoder.block.1"],
    "gemma3": ["model.layers.2", "model.layers.3"],  # sandwich norms: a per-channel map in the branch norm
}
SUBLAYER_REMOVALS = {
    "llama": ["model.layers.1.mlp", "model.layers.2.self_attn", "model.layers.3"],
    "gpt2": ["transformer.h.1.attn", "transformer.h.3.mlp"],
    "qwen2_moe": ["model.layers.1.self_attn", "model.layers.3.mlp"],
    "gemma3": ["model.layers.1.mlp", "model.layers.3.self_attn"],
    "t5": ["encoder.block.1.layer.1", "decoder.block.2.layer.1"],  # a feed-forward and a cross-attention
}


def build(name: str, seed: int = 0):
    # Eager experts: the default grouped matmul of MoE layers has no float64 kernel.
    moe = {"experts_implementation": "eager"} if name in ("mixtral", "qwen2_moe") else {}
    return tiny_model(name, seed=seed, **moe)


def batches(name: str, n: int = 3, batch: int = 4, length: int = 12, seed: int = 1) -> list:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
        if name == "t5":
            out.append({"input_ids": ids, "decoder_input_ids": torch.randint(3, VOCAB, (batch, 8), generator=generator)})
        else:
            out.append(ids)
    return out


@torch.no_grad()
def logits(model, name: str, batch=None) -> torch.Tensor:
    batch = batches(name, n=1, seed=7)[0] if batch is None else batch
    kwargs = batch if isinstance(batch, dict) else {"input_ids": batch}
    return model(**kwargs, use_cache=False).logits


def assert_same(got: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Equal up to float64 rounding: the exactness tests run the models in float64 (Gemma's RMSNorm
    computes in float32 whatever the model's dtype, so its folds are exact to float32 rounding)."""
    tolerance = 1e-6 if name == "gemma3" else 1e-9
    assert (got - expected).abs().max() <= tolerance * max(1.0, float(expected.abs().max()))


# ---------------------------------------------------------------- the explicit reference: a map inserted by hooks


SANDWICH = {"self_attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}


def _branch_module(model, unit: str):
    """The module whose output is a unit's branch output m (before the residual add)."""
    layer, _, sub = unit.rpartition(".")
    if hasattr(model.get_submodule(layer), "post_feedforward_layernorm"):  # Gemma: the norm after the branch
        return model.get_submodule(f"{layer}.{SANDWICH[sub]}")
    module = model.get_submodule(unit)
    if unit.rpartition(".")[2].isdigit():  # T5 "...layer.k": the branch inside T5LayerSelfAttention/FF
        for name in ("SelfAttention", "EncDecAttention", "DenseReluDense"):
            if hasattr(module, name):
                return getattr(module, name)
    return module


def _map_output(transform):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] @ transform.to(output[0].dtype).T, *output[1:])
        return output @ transform.to(output.dtype).T

    return hook


def explicit_map_logits(model, removals, fits, name):
    """Logits of remove_layers with a forward hook mapping each fold unit's branch output m
    to T m: what the folded weights must reproduce, with no weight changed."""
    pruned = remove_layers(model, removals)
    handles = []
    for fit in fits:
        unit = pruned.rename(fit.fold_into)
        handles.append(_branch_module(pruned.model, unit).register_forward_hook(_map_output(fit.transform)))
    try:
        return logits(pruned.model, name)
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------- exactness of the fold, per family


@pytest.mark.numeric
@pytest.mark.parametrize("name", list(REMOVALS))
@pytest.mark.parametrize("method", ["cosine", "lstsq"])
def test_fold_equals_an_explicit_map_at_the_gap(name, method):
    model = build(name).double()
    removals = REMOVALS[name]
    compensated, fits, _ = compensate(model, removals, batches(name), method)
    assert fits and all(not torch.allclose(f.transform, torch.eye(32, dtype=f.transform.dtype)) for f in fits)

    expected = explicit_map_logits(model, removals, fits, name)
    uncompensated = logits(remove_layers(model, removals).model, name)
    got = logits(compensated, name)
    assert_same(got, expected, name)
    assert (got - uncompensated).abs().max() > 1e-3, "the maps should change the model"


@pytest.mark.numeric
@pytest.mark.parametrize("name", list(SUBLAYER_REMOVALS))
def test_fold_is_exact_for_sublayer_removals(name):
    model = build(name).double()
    removals = SUBLAYER_REMOVALS[name]
    compensated, fits, _ = compensate(model, removals, batches(name))
    # A removed MLP is compensated in the attention before it, a removed attention in the previous MLP.
    expected = explicit_map_logits(model, removals, fits, name)
    assert_same(logits(compensated, name), expected, name)


def test_gaps_and_fold_targets():
    model = build("llama")
    fits = fit_compensation(model, SUBLAYER_REMOVALS["llama"], batches("llama"))
    # layers.1.mlp + layers.2.self_attn is one run; layers.3 another, right after layers.2.mlp.
    assert [(f.removed, f.fold_into) for f in fits] == [
        (["model.layers.1.mlp", "model.layers.2.self_attn"], "model.layers.1.self_attn"),
        (["model.layers.3.self_attn", "model.layers.3.mlp"], "model.layers.2.mlp"),
    ]
    assert fits[0].projections == ["model.layers.1.self_attn.o_proj.weight"]
    assert fits[1].projections == ["model.layers.2.mlp.down_proj.weight"]


def test_moe_fold_reaches_every_expert_and_the_shared_expert():
    model = build("qwen2_moe")
    assert hasattr(model.model.layers[1].mlp, "experts")
    fits = fit_compensation(model, ["model.layers.2"], batches("qwen2_moe"))
    assert set(fits[0].projections) == {
        "model.layers.1.mlp.experts.down_proj",
        "model.layers.1.mlp.shared_expert.down_proj.weight",
    }
    # The router and the shared-expert gate are untouched.
    compensated = compensate(model, ["model.layers.2"], batches("qwen2_moe")).model
    for name in ("gate.weight", "shared_expert_gate.weight", "experts.gate_up_proj"):
        original = model.model.layers[1].mlp.get_parameter(name)
        assert torch.equal(compensated.model.layers[1].mlp.get_parameter(name), original)


@pytest.mark.numeric
def test_gpt2_bias_is_mapped_too():
    model = build("gpt2")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.bias.normal_()
    compensated, fits, _ = compensate(model, ["transformer.h.1"], batches("gpt2"))
    expected = fits[0].transform.float() @ model.transformer.h[0].mlp.c_proj.bias
    assert torch.allclose(compensated.transformer.h[0].mlp.c_proj.bias, expected, atol=1e-5)


# ---------------------------------------------------------------- what does not change


@pytest.mark.parametrize("name", list(REMOVALS))
def test_parameters_and_config_are_those_of_the_uncompensated_model(name):
    model = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compensated = compensate(model, REMOVALS[name], batches(name)).model
    plain = remove_layers(model, REMOVALS[name]).model
    assert count_parameters(compensated) == count_parameters(plain)
    assert {k: v.shape for k, v in compensated.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert compensated.config.to_dict() == plain.config.to_dict()
    # Only output projections differ, and the dense input model is untouched.
    changed = {k for k, v in compensated.state_dict().items() if not torch.equal(v, plain.state_dict()[k])}
    folded = ("down_proj", "o_proj", "c_proj", ".o.", ".wo.", "post_attention_layernorm", "post_feedforward_layernorm")
    assert changed and all(any(p in k for p in folded) for k in changed)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_accepts_a_plan_and_dict_batches_with_padding():
    model = build("llama")
    ids = batches("llama")
    padded = []
    for batch in ids:
        mask = torch.ones_like(batch)
        mask[:, -3:] = 0  # right padding: the last three tokens must not count
        padded.append({"input_ids": batch, "attention_mask": mask})
    plan = PruningPlan(remove=["model.layers.2"], method="manual")
    with_mask = fit_compensation(model, plan, padded)[0]
    stats_tokens = sum(int(b["attention_mask"].sum()) for b in padded)
    assert with_mask.tokens == stats_tokens
    without_mask = fit_compensation(model, plan, ids)[0]
    assert without_mask.tokens == sum(b.numel() for b in ids)


@pytest.mark.numeric
def test_sequential_equals_dense_view_for_one_gap_and_differs_for_later_gaps():
    model = build("llama")
    one = ["model.layers.2"]
    dense_fit = compensate(model, one, batches("llama")).fits
    sequential_fit = compensate(model, one, batches("llama"), sequential=True).fits
    assert torch.allclose(dense_fit[0].transform, sequential_fit[0].transform, atol=1e-8)

    two = ["model.layers.1", "model.layers.3"]
    dense_model, dense_fits, _ = compensate(model, two, batches("llama"))
    seq_model, seq_fits, _ = compensate(model, two, batches("llama"), sequential=True)
    assert torch.allclose(dense_fits[0].transform, seq_fits[0].transform, atol=1e-8)
    assert not torch.allclose(dense_fits[1].transform, seq_fits[1].transform, atol=1e-6)
    # The sequential model is still a plain pruned model with maps folded in.
    assert count_parameters(seq_model) == count_parameters(dense_model)


@pytest.mark.numeric
def test_apply_compensation_on_a_pruned_model_equals_compensate():
    model = build("gpt2")
    removals = REMOVALS["gpt2"]
    fits = fit_compensation(model, removals, batches("gpt2"))
    applied = apply_compensation(remove_layers(model, removals), removals, fits)
    assert torch.equal(logits(applied, "gpt2"), logits(compensate(model, removals, batches("gpt2")).model, "gpt2"))


@pytest.mark.numeric
def test_compensation_lowers_the_calibration_error():
    model = build("llama")
    for method in ("cosine", "lstsq"):
        for fit in fit_compensation(model, REMOVALS["llama"], batches("llama", n=6), method):
            assert 0 <= fit.error_after < fit.error_before


# ---------------------------------------------------------------- the fit itself, on synthetic data


def _synthetic(d=16, n=4000, seed=0, outliers=False):
    g = torch.Generator().manual_seed(seed)
    truth = torch.eye(d, dtype=torch.float64) + 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    m = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    if outliers:  # a few tokens with massive norms, as LLM residual streams have
        x[:10] *= 300
        m[:10] *= 300
    y = x + m @ truth.T
    return x, m, y, truth


@pytest.mark.numeric
@pytest.mark.parametrize("method", ["lstsq", "cosine"])
@pytest.mark.parametrize("outliers", [False, True])
def test_fit_recovers_a_known_linear_map(method, outliers):
    x, m, y, truth = _synthetic(outliers=outliers)
    stats = GapStatistics(16, method)
    for chunk in range(0, len(x), 700):  # streaming, in uneven pieces
        part = slice(chunk, chunk + 700)
        stats.update(x[part], x[part] + m[part], y[part])
    fitted = stats.solve(ridge=1e-10)
    assert torch.allclose(fitted, truth, atol=1e-6)
    assert stats.relative_error(fitted) < 1e-12 < stats.relative_error(None)


@pytest.mark.numeric
def test_streaming_pieces_and_merge_give_the_same_statistics():
    x, m, y, _ = _synthetic(n=500)
    whole, first, second = (GapStatistics(16, "cosine") for _ in range(3))
    whole.update(x, x + m, y)
    first.update(x[:123], x[:123] + m[:123], y[:123])
    second.update(x[123:], x[123:] + m[123:], y[123:])
    first.merge(second)
    assert torch.allclose(first.A, whole.A) and torch.allclose(first.B, whole.B)
    assert first.tokens == whole.tokens == 500


@pytest.mark.numeric
def test_ridge_shrinks_towards_the_identity():
    x, m, y, truth = _synthetic()
    stats = GapStatistics(16, "lstsq")
    stats.update(x, x + m, y)
    eye = torch.eye(16, dtype=torch.float64)
    strong = stats.solve(ridge=1e9)
    assert torch.allclose(strong, eye, atol=1e-6)
    distances = [float((stats.solve(r) - truth).norm()) for r in (1e-6, 1e-2, 1.0, 100.0)]
    assert distances == sorted(distances)


@pytest.mark.numeric
def test_cosine_weights_every_token_alike_and_lstsq_follows_massive_tokens():
    """Outlier tokens governed by another map: lstsq fits them, cosine fits the bulk."""
    d = 8
    g = torch.Generator().manual_seed(3)
    bulk_map = torch.eye(d, dtype=torch.float64) * 0.5
    outlier_map = torch.eye(d, dtype=torch.float64) * 2.0
    m = torch.randn(2000, d, generator=g, dtype=torch.float64)
    x = torch.randn(2000, d, generator=g, dtype=torch.float64)
    y = x + m @ bulk_map.T
    m[:20] *= 1000
    x[:20] *= 1000
    y[:20] = x[:20] + m[:20] @ outlier_map.T
    fits = {}
    for method in ("lstsq", "cosine"):
        stats = GapStatistics(d, method)
        stats.update(x, x + m, y)
        fits[method] = stats.solve(ridge=1e-8)
    assert (fits["lstsq"] - outlier_map).abs().max() < 0.05
    assert (fits["cosine"] - bulk_map).abs().max() < 0.2


# ---------------------------------------------------------------- refusals


def test_refuses_post_norm_bert():
    with pytest.raises(CompensationError, match="post-norm"):
        compensate(build("bert"), ["bert.encoder.layer.1"], batches("bert"))


def test_gemma3_sandwich_norms_take_only_a_per_channel_map():
    with pytest.raises(CompensationError, match="sandwich"):
        compensate(build("gemma3"), ["model.layers.2"], batches("gemma3"), form="full")
    fits = compensate(build("gemma3"), ["model.layers.2"], batches("gemma3")).fits
    assert fits[0].form == "diagonal" and fits[0].projections == ["model.layers.1.post_feedforward_layernorm.weight"]
    transform = fits[0].transform
    assert torch.equal(transform, torch.diag(torch.diagonal(transform)))


@pytest.mark.numeric
def test_diagonal_form_is_exact_on_a_llama_too():
    model = build("llama").double()
    compensated, fits, _ = compensate(model, REMOVALS["llama"], batches("llama"), form="diagonal")
    assert all(f.form == "diagonal" for f in fits)
    assert_same(logits(compensated, "llama"), explicit_map_logits(model, REMOVALS["llama"], fits, "llama"))


def test_numerical_check_refuses_a_fold_that_is_not_exact(monkeypatch):
    """Described without its sandwich norms, Gemma3 looks like a Llama layer: the probe must still refuse it."""
    as_llama = families.Family(
        name="gemma3-as-llama", model_types=("gemma3_text",), stacks=("layers",), units=families.LLAMA.units,
        norm="pre", output_projections=families.LLAMA.output_projections,
    )
    monkeypatch.setitem(families._BY_MODEL_TYPE, "gemma3_text", as_llama)
    with pytest.raises(CompensationError, match="does not transform its branch output linearly"):
        compensate(build("gemma3"), ["model.layers.2"], batches("gemma3"))


def test_refuses_a_gap_at_the_start_of_a_stack():
    with pytest.raises(CompensationError, match="first unit of model.layers"):
        compensate(build("llama"), ["model.layers.0", "model.layers.1"], batches("llama"))
    with pytest.raises(CompensationError, match="first unit of decoder.block"):
        compensate(build("t5"), ["decoder.block.0"], batches("t5"))


def test_refuses_unknown_names_and_methods():
    with pytest.raises(CompensationError, match="not a layer or sublayer"):
        compensate(build("llama"), ["model.layers.9"], batches("llama"))
    with pytest.raises(LoRPError, match="unknown compensation method 'ridge'"):
        compensate(build("llama"), ["model.layers.2"], batches("llama"), method="ridge")


def test_refuses_empty_calibration():
    with pytest.raises(LoRPError, match="no calibration batch"):
        compensate(build("llama"), ["model.layers.2"], [])


def test_refuses_a_shared_output_projection():
    model = build("llama")
    model.model.layers[3].mlp.down_proj = model.model.layers[1].mlp.down_proj  # one tensor, two layers
    with pytest.raises(CompensationError, match="same tensor is also"):
        compensate(model, ["model.layers.2"], batches("llama"))


def test_nothing_removed_gives_the_dense_model():
    model = build("llama")
    compensated, fits, _ = compensate(model, [], batches("llama"))
    assert fits == []
    assert torch.equal(logits(compensated, "llama"), logits(model, "llama"))


# ---------------------------------------------------------------- save, reload, generate


@pytest.mark.numeric
@pytest.mark.parametrize("name", ["llama", "qwen2_moe", "gpt2", "t5", "gemma3"])
def test_compensated_checkpoint_saves_reloads_and_generates(tmp_path, name):
    model = build(name)
    compensated = compensate(model, REMOVALS[name], batches(name)).model
    out = save_pretrained_atomic(compensated, None, tmp_path / "compensated")
    auto = transformers.AutoModelForSeq2SeqLM if name == "t5" else transformers.AutoModelForCausalLM
    reloaded = auto.from_pretrained(out).eval()
    assert count_parameters(reloaded) == count_parameters(compensated)
    assert (logits(reloaded, name) - logits(compensated, name)).abs().max() < 1e-5

    prompt = torch.tensor([[5, 17, 23, 42, 8, 9]])
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with_cache = reloaded.generate(prompt, use_cache=True, **settings)
    assert torch.equal(with_cache, reloaded.generate(prompt, use_cache=False, **settings))
    assert torch.equal(with_cache, compensated.generate(prompt, use_cache=True, **settings))


@pytest.mark.numeric
def test_bfloat16_model_compensates_in_float64_and_keeps_its_dtype():
    model = build("llama").to(torch.bfloat16)
    compensated, fits, _ = compensate(model, ["model.layers.2"], batches("llama"))
    assert fits[0].transform.dtype == torch.float64
    assert all(p.dtype == torch.bfloat16 for p in compensated.parameters())
    assert fits[0].error_after < fits[0].error_before


# ---------------------------------------------------------------- ridge="auto": cross-validation over sequences


@pytest.mark.numeric
def test_auto_ridge_is_the_cross_validated_minimum():
    model = build("llama")
    fits = fit_compensation(model, REMOVALS["llama"], batches("llama", n=4))
    for fit in fits:
        assert set(fit.cv_errors) == set(RIDGE_GRID)
        assert fit.ridge == min(fit.cv_errors, key=fit.cv_errors.get)
    fixed = fit_compensation(model, REMOVALS["llama"], batches("llama", n=4), ridge=fits[0].ridge)[0]
    assert torch.allclose(fixed.transform, fits[0].transform) and fixed.cv_errors == {}


@pytest.mark.numeric
def test_auto_ridge_folds_split_by_sequence():
    x, m, y, _ = _synthetic(n=8 * 5)
    shape = (8, 5, 16)  # 8 sequences of 5 tokens, given as two batches of 4
    x, m, y = x.view(shape), m.view(shape), y.view(shape)
    acc = FoldedStatistics(16, "cosine", 4, "cpu")
    acc.update(x[:4], (x + m)[:4], y[:4], None, first_row=0)
    acc.update(x[4:], (x + m)[4:], y[4:], None, first_row=4)
    assert [f.tokens for f in acc.folds] == [10, 10, 10, 10]
    whole = GapStatistics(16, "cosine")
    whole.update(x, x + m, y)
    assert torch.allclose(acc.total().A, whole.A)


def test_auto_ridge_falls_back_with_a_single_sequence():
    model = build("llama")
    fit = fit_compensation(model, ["model.layers.2"], [batches("llama", n=1, batch=1)[0]])[0]
    assert fit.ridge == FALLBACK_RIDGE and fit.cv_errors == {}


@pytest.mark.parametrize("folding", ["sequential", "inplace"])
def test_fit_compensation_refuses_what_folds(folding):
    with pytest.raises(LoRPError, match=f"takes no {folding}; use compensate"):
        fit_compensation(build("llama"), ["model.layers.2"], batches("llama"), **{folding: True})


def test_fit_compensation_gives_the_one_pass_compensator_fits():
    model, plan, data = build("llama"), ["model.layers.2"], batches("llama", n=4)
    fits = fit_compensation(model, plan, data, "cosine", ridge=0.1)
    expected = Compensator(model, plan, data, "cosine", ridge=0.1).fits
    assert [f.fold_into for f in fits] == [f.fold_into for f in expected]
    assert all(torch.equal(a.transform, b.transform) for a, b in zip(fits, expected))


@pytest.mark.parametrize("ridge", [-1.0, "big", None, True])
def test_refuses_a_bad_ridge(ridge):
    with pytest.raises(LoRPError, match="ridge must be 'auto' or a number"):
        compensate(build("llama"), ["model.layers.2"], batches("llama"), ridge=ridge)


def test_a_graph_module_is_refused_with_the_fix():
    model = tiny_model("llama", layers=4)
    graph = lorp_fx.trace(model, trace_inputs("llama"))
    with pytest.raises(lorp_fx.CompensationError, match="eager model"):
        lorp_fx.compensate(graph, ["model.layers.2"], [torch.randint(0, 90, (2, 8))])
