"""LoRPCallback across a Trainer's life: the stage that calibrates, reuse, its state, and what apply=True hands back."""

import copy
import io
import pickle

import pytest
import torch
import transformers
from calibration_run import (
    PLAIN_FIELDS,
    Calibrated,
    calibration_data,
    loader,
    plain_data,
    trainer,
)
from test_callback_conventions import MLP
from tiny_models import eager_without, tiny_model

import lorp_fx
from lorp_fx import LoRPCallback

TOKENS = sum(int(sample["attention_mask"].sum()) for sample in calibration_data())


def fit(cb, module, epochs=1, sanity=2):
    run = trainer(cb, max_epochs=epochs, num_sanity_val_steps=sanity, limit_train_batches=2)
    run.fit(module, train_dataloaders=loader(), val_dataloaders=loader())
    return run


# ----------------------------------------------------------------------------- stages


def test_fit_leaves_the_network_alone_when_the_callback_calibrates_in_validate():
    model = tiny_model("llama", layers=4)
    module = Calibrated(model)
    cb = LoRPCallback(n_remove=1, method="shortgpt")
    fit(cb, module)
    assert cb.plan is None and module.model is model
    assert module.steps["train"] == 2


def test_stage_fit_calibrates_on_the_first_real_validation_loop_never_on_sanity_batches():
    model = tiny_model("llama", layers=5)
    module = Calibrated(model)
    cb = LoRPCallback(n_remove=1, method="shortgpt", stage="fit", apply=True)
    run = fit(cb, module, epochs=2)
    # The sanity check saw 2 of the 4 validation batches; the plan counts every token of one full loop.
    assert cb.plan.statistics.token_count == TOKENS
    assert module.steps["train"] == 4  # training went on, on the pruned model, after the first validation
    assert module.model is model and model.config.num_hidden_layers == 4
    trained = {id(p) for group in run.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in model.parameters()} <= trained  # in place: the optimizer holds the kept weights


@pytest.mark.parametrize("stage", ["test", "predict"])
def test_test_and_predict_stages_calibrate_in_their_own_loops(stage):
    model = tiny_model("llama", layers=4)
    module = Calibrated(model, call="mixed")
    cb = LoRPCallback(n_remove=1, method="shortgpt", stage=stage, apply=True)
    run = trainer(cb)
    run.validate(module, dataloaders=loader())  # another stage: nothing happens
    assert cb.plan is None and module.model is model
    getattr(run, stage)(module, dataloaders=loader(form="tuple"))
    assert cb.plan.statistics.token_count == TOKENS and model.config.num_hidden_layers == 3


def test_an_unknown_stage_is_refused():
    with pytest.raises(lorp_fx.ConfigError, match="stage must be one of"):
        LoRPCallback(n_remove=1, stage="train")


# ----------------------------------------------------------------------------- reuse and state


def test_a_calibrated_callback_refuses_another_module_until_reset():
    first, second = Calibrated(tiny_model("llama", layers=4)), Calibrated(tiny_model("llama", layers=4, seed=1))
    cb = LoRPCallback(n_remove=1, method="shortgpt")
    run = trainer(cb)
    run.validate(first, dataloaders=loader())
    plan = cb.plan
    run.validate(first, dataloaders=loader())  # the same module: measures only
    assert cb.plan is plan
    with pytest.raises(lorp_fx.CalibrationError, match="already holds a plan.*reset"):
        run.validate(second, dataloaders=loader())
    cb.reset()
    run.validate(second, dataloaders=loader())
    assert cb.plan is not plan
    assert not (cb.plan.similarity == plan.similarity).all()


def test_state_dict_and_load_state_dict_mirror_each_other_through_a_checkpoint(tmp_path):
    cb = LoRPCallback(n_remove=1, method="shortgpt")
    run = trainer(cb)
    run.validate(Calibrated(tiny_model("llama", layers=4)), dataloaders=loader())
    run.save_checkpoint(tmp_path / "run.ckpt")
    saved = torch.load(tmp_path / "run.ckpt", weights_only=False)["callbacks"][cb.state_key]
    restored = LoRPCallback(n_remove=1, method="shortgpt")
    restored.load_state_dict(saved)
    assert restored.state_dict() == cb.state_dict() == saved
    assert restored.plan.remove == cb.plan.remove
    assert (restored.plan.similarity == cb.plan.similarity).all()


# ----------------------------------------------------------------------------- apply=True


def test_apply_hands_back_the_eager_transformers_model_which_validates_again_generates_saves_and_pickles(tmp_path):
    model = tiny_model("gpt2", layers=5)  # GPT-2's config has dropout, so .train() is visible
    dense = copy.deepcopy(model)
    module = Calibrated(model, call="keywords")  # validation_step passes use_cache=False
    cb = LoRPCallback(n_remove=2, method="shortgpt", apply=True)
    run = trainer(cb)
    run.validate(module, dataloaders=loader())
    pruned = module.model
    assert type(pruned) is type(dense) and pruned.config.n_layer == 3 == len(pruned.transformer.h)

    # The README's second validate measures the pruned model, whose loss is the eager deletion's.
    loss = run.validate(module, dataloaders=loader())[0]["loss"]
    reference = Calibrated(eager_without(dense, cb.plan.remove))
    assert loss == pytest.approx(trainer().validate(reference, dataloaders=loader())[0]["loss"], rel=1e-5)

    ids = calibration_data()[0]["input_ids"][None]
    mask = torch.ones_like(ids)
    graph = lorp_fx.prune(cb.graph_module, cb.plan)  # traced with an attention mask: it needs one
    with torch.no_grad():
        logits = pruned(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(logits, graph(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
        cached = pruned.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = pruned.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert cached.shape[1] == ids.shape[1] + 5 and torch.equal(cached, uncached)

    pruned.save_pretrained(tmp_path / "pruned")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    unpickled = pickle.loads(pickle.dumps(module)).model
    buffer = io.BytesIO()
    torch.save(pruned, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        for other in (reloaded, unpickled, loaded):
            torch.testing.assert_close(other(input_ids=ids).logits, logits)
        pruned.train()
        assert not torch.equal(pruned(input_ids=ids).logits, pruned(input_ids=ids).logits)  # dropout is back
        pruned.eval()
        torch.testing.assert_close(pruned(input_ids=ids).logits, logits)


def test_apply_on_a_plain_network_hands_back_the_pruned_graph_which_pickles_and_trains():
    torch.manual_seed(0)
    network = MLP()
    network.blocks.append(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(0.5)))
    module = Calibrated(network, call="x", fields=PLAIN_FIELDS)
    cb = LoRPCallback(n_remove=2, method="shortgpt", apply=True)
    run = trainer(cb)
    run.validate(module, dataloaders=loader(plain_data(), form="tuple"))
    graph = module.model
    assert isinstance(graph, torch.fx.GraphModule) and len(lorp_fx.find_blocks(graph)) == 3
    run.validate(module, dataloaders=loader(plain_data(), form="tuple"))  # measures the pruned graph

    x = torch.randn(4, 16)
    graph.eval()
    with torch.no_grad():
        expected = graph(x)
        removed = {int(name.split(".")[1]) for name in cb.plan.remove}  # blocks.<i>...
        kept = [block for i, block in enumerate(network.blocks) if i not in removed]
        h = x
        for block in kept:
            h = h + block(h)
        torch.testing.assert_close(expected, network.head(h))
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False).model
        torch.testing.assert_close(loaded(x), expected)
        assert any(isinstance(m, torch.nn.Dropout) for m in graph.modules())  # the last block: protected
        graph.train()
        assert not torch.equal(graph(x), graph(x))  # the kept dropout follows .train()


class ShapeBranching(torch.nn.Module):
    """Python control flow on a shape: symbolic_trace cannot follow it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(0.1)) for _ in range(4))
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        if x.shape[-1] != 16:
            raise ValueError("16 features expected")
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_apply_on_a_network_only_torch_export_traces_warns_that_it_stays_in_eval_mode():
    torch.manual_seed(0)
    module = Calibrated(ShapeBranching(), call="x", fields=PLAIN_FIELDS)
    cb = LoRPCallback(n_remove=1, method="shortgpt", apply=True)
    with pytest.warns(UserWarning, match="torch.export graph.*dropout stay as in eval mode"):
        trainer(cb).validate(module, dataloaders=loader(plain_data(), form="tuple"))
    assert module.model.meta.get("lorp_fx_frontend") == "export"


def test_stage_fit_without_a_validation_loop_says_so():
    module = Calibrated(tiny_model("llama", layers=4))
    run = trainer(LoRPCallback(n_remove=1, method="shortgpt", stage="fit"), max_epochs=1, limit_train_batches=1)
    with pytest.raises(lorp_fx.CalibrationError, match="no calibration batch was seen in any validation loop"):
        run.fit(module, train_dataloaders=loader())
