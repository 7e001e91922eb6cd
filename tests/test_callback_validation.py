"""LoRPCallback checks its arguments up front: a value that is wrong on its own is refused by
`__init__` with one lorp_fx error, and whatever depends on the network (n_clusters above the
block count, sublayers of a post-norm transformers model with apply=True) as soon as the
callback sees the network, before any statistics are collected."""

from pathlib import Path

import numpy as np
import pytest
from calibration_run import Calibrated, loader, trainer
from tiny_models import tiny_model

import lorp_fx
from lorp_fx import LoRPCallback

class SummedOutput:
    """A loss_fn whose repr is the same in every process (test ids are built from repr; xdist compares them)."""

    def __call__(self, output, inputs):
        return output.sum()

    def __repr__(self) -> str:
        return "SummedOutput()"


# (arguments besides n_remove=1, the error class, what the message must say)
BAD_ARGUMENTS = [
    ({"attribute": 3}, lorp_fx.ConfigError, "attribute must be the name of the LightningModule attribute"),
    ({"attribute": "model.net"}, lorp_fx.ConfigError, "attribute must be the name"),
    ({"attribute": ""}, lorp_fx.ConfigError, "attribute must be the name"),
    ({"method": "random", "seed": -1}, lorp_fx.ConfigError, "seed must be a whole number >= 0.*got -1"),
    ({"method": "random", "seed": "a"}, lorp_fx.ConfigError, "seed must be a whole number >= 0.*got 'a'"),
    ({"method": "random", "seed": 1.5}, lorp_fx.ConfigError, "seed must be a whole number"),
    ({"method": "random", "seed": True}, lorp_fx.ConfigError, "seed must be a whole number"),
    ({"apply": "yes"}, lorp_fx.ConfigError, "apply must be True or False.*got 'yes'"),
    ({"apply": "False"}, lorp_fx.ConfigError, "apply must be True or False"),
    ({"apply": 2}, lorp_fx.ConfigError, "apply must be True or False"),
    ({"apply": None}, lorp_fx.ConfigError, "apply must be True or False"),
    ({"plan_path": 3}, lorp_fx.ConfigError, "plan_path must be a file path.*got 3"),
    ({"plan_path": ""}, lorp_fx.ConfigError, "plan_path must be a file path"),
    ({"plan_path": b"plan.json"}, lorp_fx.ConfigError, "plan_path must be a file path"),
    # a folder that is not there: refused here, not after calibration with a raw FileNotFoundError
    ({"plan_path": "/missing/dir/plan.json"}, lorp_fx.PlanError, "the folder /missing/dir does not exist"),
    ({"plan_path": "/"}, lorp_fx.PlanError, "is a folder; name a file in it"),
    ({"method": "lorp-paper", "n_clusters": 0}, lorp_fx.SelectorError, "n_clusters=0 must be a whole number.*at least 1"),
    ({"method": "lorp-paper", "n_clusters": "x"}, lorp_fx.SelectorError, "n_clusters='x' must be a whole number"),
    ({"method": "lorp-hier", "n_clusters": 2.0}, lorp_fx.SelectorError, "n_clusters=2.0 must be a whole number"),
    ({"method": "shortgpt", "protected": 3.5}, lorp_fx.ConfigError, "protected must be a block name or index, or a list"),
    ({"method": "shortgpt", "protected": [0, None]}, lorp_fx.ConfigError, "protected must be a block name or index"),
    ({"method": "shortgpt", "protected": [True]}, lorp_fx.ConfigError, "protected must be a block name or index"),
    ({"method": "shortgpt", "protected": {"model.layers.0": 1}}, lorp_fx.ConfigError, "protected must be"),
    ({"method": ["shortgpt"]}, lorp_fx.SelectorError, "unknown selection method"),
    ({"method": 3}, lorp_fx.SelectorError, "unknown selection method 3; choose one of"),
    ({"compensate": "ridge"}, lorp_fx.ConfigError, "compensate must be None, 'auto' or one of"),
    ({"compensate": "auto", "method": "sleb", "loss_fn": SummedOutput()}, lorp_fx.ConfigError,
     "compensate judges by the next-token loss, so it takes no loss_fn"),
]


@pytest.mark.parametrize("arguments, error, message", BAD_ARGUMENTS, ids=[repr(a) for a, _, _ in BAD_ARGUMENTS])
def test_an_argument_wrong_on_its_own_is_one_lorp_fx_error_from_init(arguments, error, message):
    with pytest.raises(error, match=message) as raised:
        LoRPCallback(n_remove=1, **arguments)
    assert isinstance(raised.value, lorp_fx.LoRPError)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("arguments", [
    {"apply": True}, {"apply": False}, {"apply": 1}, {"apply": 0}, {"apply": np.bool_(True)},
    {"method": "random", "seed": 0}, {"method": "random", "seed": np.int64(3)},
    {"plan_path": "plan.json"}, {"plan_path": Path("plan.json")},
    {"method": "shortgpt", "protected": "model.layers.0"}, {"method": "shortgpt", "protected": -1},
    {"method": "shortgpt", "protected": ["model.layers.0", -1]}, {"method": "shortgpt", "protected": (0, 3)},
    {"method": "shortgpt", "protected": []},
    {"method": "lorp-paper", "n_clusters": 2}, {"method": "lorp-hier", "n_clusters": np.int64(2)},
    {"attribute": "net"},
])
def test_valid_arguments_stay_valid(arguments):
    cb = LoRPCallback(n_remove=1, **arguments)
    if "apply" in arguments:
        assert cb.apply is bool(arguments["apply"])


def test_n_clusters_above_the_block_count_is_refused_on_the_first_batch():
    model = tiny_model("llama", layers=4)
    module = Calibrated(model)
    cb = LoRPCallback(n_remove=1, method="lorp-paper", n_clusters=99)
    with pytest.raises(lorp_fx.SelectorError, match=r"n_clusters=99 must be a whole number between 1 and the number of blocks \(4\)"):
        trainer(cb).validate(module, dataloaders=loader())
    assert module.steps["validation"] == 1  # refused on the first batch, not after the loop
    assert module.model is model and cb.plan is None


POST_NORM = "cannot prune BertForMaskedLM by sublayers: bert normalises after each residual add \\(post-norm\\).*granularity='layer'"


def test_apply_of_sublayers_of_a_post_norm_transformers_model_is_refused_before_calibrating():
    model = tiny_model("bert")
    module = Calibrated(model, call="plain_keywords")
    cb = LoRPCallback(n_remove=1, apply=True, method="shortgpt", granularity="sublayer")
    with pytest.raises(lorp_fx.NotRemovableError, match=POST_NORM) as raised:
        trainer(cb).validate(module, dataloaders=loader())
    assert "\n" not in str(raised.value)
    assert module.steps["validation"] == 0  # no batch ran
    assert module.model is model
    assert cb.plan is None and cb.graph_module is None  # no plan left that cannot be applied


def test_compensation_of_a_network_that_cannot_take_a_map_is_refused_or_left_out_before_calibrating():
    """A plain network has no layers to fold a map into; post-norm BERT takes none ("auto" leaves it out)."""
    from calibration_run import PLAIN_FIELDS
    from test_callback_conventions import MLP, plain_data

    module = Calibrated(MLP(), call="x", fields=PLAIN_FIELDS)
    with pytest.raises(lorp_fx.ConfigError, match="compensate folds maps into a transformers causal LM"):
        trainer(LoRPCallback(n_remove=1, method="shortgpt", compensate="auto")).validate(
            module, dataloaders=loader(plain_data(), form="tuple"))
    assert module.steps["validation"] == 0
    bert = Calibrated(tiny_model("bert"), call="plain_keywords")
    with pytest.raises(lorp_fx.ConfigError, match="compensate='cosine'"):
        trainer(LoRPCallback(n_remove=1, method="shortgpt", compensate="cosine")).validate(bert, dataloaders=loader())
    cb = LoRPCallback(n_remove=1, method="shortgpt", compensate="auto", apply=True)
    trainer(cb).validate(bert, dataloaders=loader())
    assert cb.plan is not None and cb.compensation is None and cb.fits == []


class MadeInConfigureModel(Calibrated):
    """A LightningModule that builds its network in `configure_model`, after the callbacks' setup."""

    def __init__(self, make):
        super().__init__(None, call="plain_keywords")
        self.make = make

    def configure_model(self):
        if self.model is None:
            self.model = self.make()


def test_a_post_norm_network_made_after_setup_is_refused_when_its_loop_starts():
    module = MadeInConfigureModel(lambda: tiny_model("bert"))
    cb = LoRPCallback(n_remove=1, apply=True, method="shortgpt", granularity="sublayer")
    with pytest.raises(lorp_fx.NotRemovableError, match=POST_NORM):
        trainer(cb).validate(module, dataloaders=loader())
    assert module.steps["validation"] == 0
    assert type(module.model).__name__ == "BertForMaskedLM" and cb.plan is None


def test_sublayers_of_a_post_norm_model_are_still_planned_without_apply():
    model = tiny_model("bert")
    module = Calibrated(model, call="plain_keywords")
    cb = LoRPCallback(n_remove=1, method="shortgpt", granularity="sublayer")
    trainer(cb).validate(module, dataloaders=loader())
    assert module.model is model
    assert cb.plan is not None and cb.plan.granularity == "sublayer" and len(cb.plan.remove) == 1
