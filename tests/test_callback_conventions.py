"""LoRPCallback takes the LightningModule as written: every calling convention and batch form,
the network's own inputs for the loss, and failures on the first batch rather than after the loop."""

import numpy as np
import pytest
import torch
from calibration_run import (
    PLAIN_FIELDS,
    Calibrated,
    calibration_data,
    eager_statistics,
    loader,
    plain_data,
    trainer,
)
from tiny_models import eager_without, tiny_model

import lorp_fx
from lorp_fx import LoRPCallback

# (how validation_step calls the network, the batch form, whether the network sees the padding mask)
CONVENTIONS = [
    ("keywords", "dict", True),
    ("positional", "tuple", True),
    ("mixed", "list", True),
    ("unpack", "dict", True),
    ("ids_only", "tuple", False),
    ("labels", "list", False),
]


def next_token_losses_without(model, block: str, masked: bool, batches: int = 2) -> float:
    """The loss sleb must have measured for `block`: the eager model without it, on the windows (rows) of the
    first `batches` batches, called with the padding mask only when the network saw it; each window's mean
    token loss, averaged over the windows (`lorp_fx/lightning/windows.py`)."""
    pruned = eager_without(model, [block])
    losses = []
    with torch.no_grad():
        for batch in list(loader())[:batches]:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            logits = pruned(input_ids=ids, attention_mask=mask if masked else None, use_cache=False).logits
            each = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            keep = mask[:, 1:].bool() if masked else torch.ones_like(each, dtype=torch.bool)
            losses.extend(float(row[kept].mean()) for row, kept in zip(each, keep))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("call, form, masked", CONVENTIONS)
def test_every_calling_convention_and_batch_form_gives_the_eager_statistics_and_losses(call, form, masked):
    model = tiny_model("llama", layers=4)
    cb = LoRPCallback(n_remove=1, method="sleb")
    module = Calibrated(model, call=call)
    trainer(cb).validate(module, dataloaders=loader(form=form))
    assert module.model is model
    reference = eager_statistics(model, calibration_data(), masked=masked)
    np.testing.assert_allclose(cb.plan.similarity, reference.similarity, atol=1e-6)
    assert cb.plan.statistics.token_count == reference.token_count
    # sleb's first step removes each candidate alone; its losses are measured on the network's own inputs.
    assert set(cb.plan.scores) == {"model.layers.1", "model.layers.2"}
    for block, loss in cb.plan.scores.items():
        assert loss == pytest.approx(next_token_losses_without(model, block, masked), rel=1e-5)


def test_lorp_measures_the_loss_from_tuple_batches_instead_of_falling_back_to_statistics():
    cb = LoRPCallback(n_remove=2, method="lorp")
    trainer(cb).validate(Calibrated(tiny_model("llama", layers=6), call="positional"), dataloaders=loader(form="tuple"))
    # Without a loss lorp falls back to ShortGPT's rule and reports no loss.
    assert np.isfinite(cb.plan.details["loss"]), cb.plan.details


# ----------------------------------------------------------------------------- plain networks


class MLP(torch.nn.Module):
    def __init__(self, width=16, depth=4, classes=3):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width))
            for _ in range(depth)
        )
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


@pytest.mark.parametrize("call, form", [("x", "tuple"), ("x_keyword", "dict")])
def test_a_plain_network_called_with_its_input_calibrates(call, form):
    torch.manual_seed(0)
    network = MLP()
    cb = LoRPCallback(n_remove=1, method="shortgpt")
    trainer(cb).validate(Calibrated(network, call=call, fields=PLAIN_FIELDS), dataloaders=loader(plain_data(), form=form))
    assert cb.plan.statistics.token_count == 8  # one token per example: (batch, d) states
    assert len(cb.plan.statistics.blocks) == 4 and cb.plan.remove[0] in cb.plan.statistics.blocks


def test_a_loss_judged_method_on_a_network_without_logits_fails_on_the_first_batch():
    torch.manual_seed(0)
    module = Calibrated(MLP(), call="x", fields=PLAIN_FIELDS)
    with pytest.raises(lorp_fx.SelectorError, match="'lorp' judges candidates by calibration loss.*loss_fn="):
        trainer(LoRPCallback(n_remove=1)).validate(module, dataloaders=loader(plain_data(), form="tuple"))
    assert module.steps["validation"] == 1
    assert isinstance(module.model, MLP)


def test_loss_fn_sees_the_network_output_and_its_inputs_by_name():
    torch.manual_seed(0)
    network = MLP()
    data = plain_data()
    seen = []

    def loss_fn(output, inputs):
        seen.append(inputs)
        return output.logsumexp(-1).mean()

    cb = LoRPCallback(n_remove=1, method="sleb", loss_fn=loss_fn, loss_batches=3)
    trainer(cb).validate(Calibrated(network, call="x", fields=PLAIN_FIELDS), dataloaders=loader(data, form="list"))
    assert all(set(inputs) == {"x"} for inputs in seen)
    # seen[0]: the first-batch check; then the loss windows one by one (3 batches of 2 rows)
    firsts = torch.cat([inputs["x"] for inputs in seen[1:7]])
    torch.testing.assert_close(firsts, torch.stack([d["x"] for d in data[:6]]))
    blocks = cb.plan.statistics.blocks
    for index, block in enumerate(blocks[1:-1], start=1):
        kept = [b for i, b in enumerate(network.blocks) if i != index]
        with torch.no_grad():
            expected = []
            for start in (0, 2, 4):
                x = torch.stack([d["x"] for d in data[start : start + 2]])
                for b in kept:
                    x = x + b(x)
                expected.append(float(network.head(x).logsumexp(-1).mean()))
        assert cb.plan.scores[block] == pytest.approx(sum(expected) / 3, rel=1e-5)


def test_a_broken_loss_fn_fails_on_the_first_batch():
    torch.manual_seed(0)
    module = Calibrated(MLP(), call="x", fields=PLAIN_FIELDS)
    cb = LoRPCallback(n_remove=1, method="sleb", loss_fn=lambda output, inputs: output)  # not one number
    with pytest.raises(lorp_fx.SelectorError, match="loss_fn.*failed on the first calibration call"):
        trainer(cb).validate(module, dataloaders=loader(plain_data(), form="tuple"))
    assert module.steps["validation"] == 1


def test_loss_fn_is_refused_for_a_statistics_method():
    with pytest.raises(lorp_fx.ConfigError, match="takes no loss_fn"):
        LoRPCallback(n_remove=1, method="shortgpt", loss_fn=lambda output, inputs: 0.0)


@pytest.mark.parametrize("options, message", [
    ({"measure_loss": "no"}, "measure_loss must be True or False"),
    ({"measure_loss": False, "method": "sleb"}, "cannot choose without a calibration loss"),
    ({"measure_loss": False, "loss_fn": lambda output, inputs: 0.0}, "drop one of them"),
])
def test_measure_loss_is_checked_when_the_callback_is_made(options, message):
    with pytest.raises(lorp_fx.ConfigError, match=message):
        LoRPCallback(n_remove=1, **options)


def test_without_the_loss_lorp_chooses_from_the_statistics_alone():
    """measure_loss=False (what the command line asks for an encoder-decoder): no loss is measured, and the
    plan is lorp's statistics-only choice."""
    cb = LoRPCallback(n_remove=2, measure_loss=False)
    trainer(cb).validate(Calibrated(tiny_model("llama", layers=6)), dataloaders=loader())
    expected = lorp_fx.select(cb.plan.statistics, 2, method="lorp")
    assert cb.plan.remove == expected.remove
    assert cb.plan.details["objective"].startswith("statistics") and "evaluations" not in cb.plan.details


# ----------------------------------------------------------------------------- first-batch failures


def test_a_budget_that_cannot_be_met_fails_on_the_first_batch():
    model = tiny_model("llama", layers=4)
    module = Calibrated(model)
    with pytest.raises(lorp_fx.BudgetError, match="cannot remove 3 of 4 layer blocks"):
        trainer(LoRPCallback(n_remove=3, method="shortgpt")).validate(module, dataloaders=loader())
    assert module.steps["validation"] == 1 and module.model is model


class CallsTheInnerModel(Calibrated):
    def validation_step(self, batch, batch_idx):
        self.steps["validation"] += 1
        return self.model.model(input_ids=batch["input_ids"]).last_hidden_state.mean()


def test_a_validation_step_that_bypasses_the_attribute_is_named_on_the_first_batch():
    module = CallsTheInnerModel(tiny_model("llama", layers=4))
    with pytest.raises(lorp_fx.LoRPError, match="did not call CallsTheInnerModel.model on the first batch"):
        trainer(LoRPCallback(n_remove=1, method="shortgpt")).validate(module, dataloaders=loader())
    assert module.steps["validation"] == 1
