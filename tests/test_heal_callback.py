"""`LoRPCallback(..., apply=True, heal_steps=N)`: the user's own Trainer calibrates, prunes and heals, with their
LightningModule unchanged."""

from __future__ import annotations

import pytest
import torch
from calibration_run import Calibrated, calibration_data, loader, trainer
from tiny_models import tiny_model

import lorp_fx
from lorp_fx import LoRPCallback
from lorp_fx.arch.surgery import count_parameters, remove_layers
from lorp_fx.core.errors import ConfigError


def unpadded(n=24, length=12, seed=0):
    return [{"input_ids": s["input_ids"], "attention_mask": torch.ones_like(s["attention_mask"])}
            for s in calibration_data(n, length, seed)]


def test_validate_calibrates_prunes_and_heals_the_users_network():
    dense = tiny_model("llama", layers=6)
    reference = tiny_model("llama", layers=6)  # the same weights: what the network was before the run
    callback = LoRPCallback(2, method="shortgpt", apply=True,
                            heal=lorp_fx.HealConfig(steps=4, batch_size=4, held_out=4, lr=3e-3))
    module = Calibrated(dense)
    trainer(callback).validate(module, dataloaders=loader(unpadded(), batch_size=4))
    healed = module.model
    unhealed = remove_layers(reference, callback.plan).model
    assert count_parameters(healed) == count_parameters(unhealed) and len(healed.model.layers) == 4
    assert any(not torch.equal(a, b) for a, b in zip(healed.state_dict().values(), unhealed.state_dict().values()))
    report = callback.healing.report
    assert report["steps"] == 4 and report["windows"] == 20  # 24 calibration windows, 4 held out
    assert report["loss_curve"][-1][2] < report["loss_curve"][0][2]  # the distillation loss went down
    trainer().validate(module, dataloaders=loader(unpadded(), batch_size=4))  # the healed network keeps working


def test_heal_steps_is_the_short_form():
    callback = LoRPCallback(2, method="shortgpt", apply=True, heal_steps=3)
    assert callback.healing.config.steps == 3


@pytest.mark.parametrize("options, message", [
    ({"heal_steps": 3}, "pass apply=True"),
    ({"heal_steps": -1, "apply": True}, "heal_steps must be a whole number"),
    ({"heal_steps": 3, "heal": lorp_fx.HealConfig(), "apply": True}, "not both"),
])
def test_bad_healing_options_are_refused_when_the_callback_is_made(options, message):
    with pytest.raises(ConfigError, match=message):
        LoRPCallback(2, method="shortgpt", **options)


def test_padded_calibration_batches_ask_for_heal_data():
    callback = LoRPCallback(2, method="shortgpt", apply=True, heal_steps=2)
    with pytest.raises(ConfigError, match="heal_data"):
        trainer(callback).validate(Calibrated(tiny_model("llama", layers=6)), dataloaders=loader())
