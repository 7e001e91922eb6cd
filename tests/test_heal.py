"""`lorp_fx.heal`: distillation after pruning, on tiny models (seconds each).

What users rely on: the healed model has the pruned model's shape and parameter count
(adapters merged away); a seed gives the same weights; a run resumed from its checkpoint
ends where an uninterrupted run ends; cached and on-the-fly teacher outputs train alike;
healing lowers the distillation loss it optimizes.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import lorp_fx
from lorp_fx.arch.surgery import count_parameters, remove_layers
from lorp_fx.core.errors import CalibrationError, ConfigError
from lorp_fx.core.plan import PruningPlan
from lorp_fx.healing.data import step_windows
from lorp_fx.healing.module import Distillation, distillation_loss
from lorp_fx.healing.trainer import HealingInterrupted

PLAN = PruningPlan(remove=["model.layers.2", "model.layers.3"], method="manual")


def pair(family: str = "llama", layers: int = 6, plan: PruningPlan = PLAN):
    teacher = tiny_model(family, layers)
    return remove_layers(teacher, plan).model, teacher


def windows(n: int = 24, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def config(**options) -> lorp_fx.HealConfig:
    """Float32 unless asked: the same numbers on every CPU (bf16 autocast kernels differ between CPUs)."""
    return lorp_fx.HealConfig(**{"steps": 6, "batch_size": 4, "held_out": 4, "lr": 3e-3, "precision": "32", **options})


def heal(student, dense, data=None, **options):
    return lorp_fx.heal(student, dense, windows() if data is None else data, config(**options), plan=PLAN,
                        progress=False)


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def kl_on(model, teacher, data) -> float:
    with torch.no_grad():
        return float(distillation_loss(model(input_ids=data).logits, teacher(input_ids=data).logits))


# ----------------------------------------------------------------------------- what trains


@pytest.mark.parametrize("train", ["gaps", "lora", "all"])
def test_healing_keeps_the_pruned_shape_and_lowers_the_loss_it_trains(train):
    student, teacher = pair()
    before, held = weights(student), windows(8, seed=5)
    loss_before = kl_on(student, teacher, held)
    result = heal(student, teacher, train=train, steps=12)
    model = result.model
    assert type(model) is type(student) and count_parameters(model) == count_parameters(teacher) - 2 * count_parameters(teacher.model.layers[0])
    assert set(weights(model)) == set(before)  # no adapter left: the same tensors, the same shapes
    assert all(weights(model)[k].shape == v.shape for k, v in before.items())
    changed = {k for k, v in weights(model).items() if not torch.equal(v, before[k])}
    assert changed and changed <= set(result.changed) | {"lm_head.weight"}  # a tied head is the embedding's name
    assert kl_on(model, teacher, held) < loss_before
    assert result.report["parameters"] == count_parameters(model)
    assert all(p.requires_grad for p in model.parameters())  # as the loaded model had them


def test_gaps_trains_the_kept_layers_next_to_each_gap_and_nothing_else():
    student, teacher = pair(layers=7, plan=PruningPlan(remove=["model.layers.1", "model.layers.4", "model.layers.5"],
                                                       method="manual"))
    before = weights(student)
    result = lorp_fx.heal(student, teacher, windows(), config(), plan=PruningPlan(
        remove=["model.layers.1", "model.layers.4", "model.layers.5"], method="manual"), progress=False)
    changed = {k for k, v in weights(result.model).items() if not torch.equal(v, before[k])}
    # dense layers 0 | 1 | 2 3 | 4 5 | 6 -> kept 0, 2, 3, 6 = new 0, 1, 2, 3; neighbours: old 0, 2, 3, 6
    assert {k.split(".")[2] for k in changed} == {"0", "1", "2", "3"}
    assert all(k.startswith("model.layers.") for k in changed)


def test_lora_adapters_are_merged_and_change_only_layer_projections():
    student, teacher = pair()
    before = weights(student)
    model = heal(student, teacher, train="lora").model
    assert not any("lora" in name for name, _ in model.named_modules())
    changed = {k for k, v in weights(model).items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith("_proj.weight") and k.startswith("model.layers.") for k in changed)


def test_lora_without_peft_is_one_line_with_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    student, teacher = pair()
    with pytest.raises(ConfigError, match="pip install peft"):
        heal(student, teacher, train="lora")


# ----------------------------------------------------------------------------- the same run, every time


def test_a_seed_gives_the_same_healed_weights_and_another_seed_other_ones():
    runs = []
    for seed in (0, 0, 1):
        student, teacher = pair()
        runs.append(weights(heal(student, teacher, seed=seed).model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


@pytest.mark.parametrize("precision, tolerance", [("32", 1e-6), ("bf16", 1e-3)])
def test_cached_and_on_the_fly_teacher_outputs_train_alike(precision, tolerance):
    """The cache is computed as the steps compute the teacher (under bf16 autocast where training is)."""
    results = {}
    for mode in ("cached", "on_the_fly"):
        student, teacher = pair()
        healed = heal(student, teacher, teacher=mode, hidden_weight=0.5, precision=precision)
        assert healed.report["teacher"]["outputs"] == mode
        assert healed.report["precision"] == ("32-true" if precision == "32" else "bf16-mixed")
        results[mode] = weights(healed.model)
    for name, tensor in results["cached"].items():
        torch.testing.assert_close(tensor, results["on_the_fly"][name], rtol=0, atol=tolerance)


def test_auto_caches_only_where_the_cache_is_smaller_than_the_teacher():
    student, teacher = pair()
    few = heal(student, teacher, steps=1, batch_size=1, held_out=0, data=windows(2))  # 2 x 16 tokens of 97 logits
    assert few.report["teacher"]["outputs"] == "cached"
    student, teacher = pair()
    many = heal(student, teacher, steps=2, data=windows(200))
    assert many.report["teacher"]["outputs"] == "on_the_fly"
    assert many.report["teacher"]["cache_bytes"] > many.report["teacher"]["teacher_weight_bytes"]


def test_each_step_reads_its_own_windows_whatever_the_number_of_processes():
    one = [step_windows(s, 10, 4, 1, 0, seed=3) for s in range(5)]
    two = [step_windows(s, 10, 2, 2, 0, seed=3) + step_windows(s, 10, 2, 2, 1, seed=3) for s in range(5)]
    assert one == two
    flat = [i for batch in one for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # every window, each pass


def test_a_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch):
    student, teacher = pair()
    reference = heal(student, teacher, steps=6)
    step = Distillation.training_step

    def interrupt_at_step_4(self, batch, batch_idx):
        if self.global_step == 4:
            raise KeyboardInterrupt
        return step(self, batch, batch_idx)

    monkeypatch.setattr(Distillation, "training_step", interrupt_at_step_4)
    student, teacher = pair()
    with pytest.raises(HealingInterrupted, match="--heal-resume") as stopped:
        heal(student, teacher, steps=6, checkpoint_every=3, checkpoint_dir=str(tmp_path))
    checkpoint = tmp_path / "last.ckpt"
    assert checkpoint.is_file() and str(checkpoint) in str(stopped.value)
    monkeypatch.setattr(Distillation, "training_step", step)
    student, teacher = pair()
    resumed = heal(student, teacher, steps=6, checkpoint_dir=str(tmp_path), resume=str(checkpoint))
    for name, tensor in weights(reference.model).items():
        assert torch.equal(tensor, weights(resumed.model)[name]), name
    assert resumed.report["loss_curve"] == reference.report["loss_curve"]
    assert not checkpoint.exists()  # a run that ended well: the healed model is the output


def test_a_checkpoint_of_another_model_or_plan_is_refused_before_training(tmp_path, monkeypatch):
    student, teacher = pair()
    step = Distillation.training_step
    monkeypatch.setattr(Distillation, "training_step",
                        lambda self, b, i: (_ for _ in ()).throw(KeyboardInterrupt) if self.global_step == 2 else step(self, b, i))
    with pytest.raises(HealingInterrupted):
        heal(student, teacher, checkpoint_every=1, checkpoint_dir=str(tmp_path))
    monkeypatch.setattr(Distillation, "training_step", lambda *a: pytest.fail("trained"))
    checkpoint = str(tmp_path / "last.ckpt")
    other_teacher = tiny_model("llama", 6, seed=7)
    with pytest.raises(ConfigError, match="another model"):
        heal(remove_layers(other_teacher, PLAN).model, other_teacher, resume=checkpoint)
    other = PruningPlan(remove=["model.layers.1", "model.layers.4"], method="manual")
    with pytest.raises(ConfigError, match="another pruning plan"):
        lorp_fx.heal(remove_layers(teacher, other).model, teacher, windows(), config(resume=checkpoint), plan=other,
                     progress=False)
    with pytest.raises(ConfigError, match="trained with train gaps"):
        heal(student, teacher, resume=checkpoint, train="all")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("options, message", [
    ({"steps": -1}, "steps must be a whole number >= 1"),
    ({"steps": "10"}, "steps must be a whole number"),
    ({"batch_size": 0}, "batch_size"),
    ({"train": "head"}, "train must be one of gaps, lora, all"),
    ({"lr": 0}, "lr must be a number > 0"),
    ({"hidden_weight": float("nan")}, "hidden_weight"),
    ({"teacher": "disk"}, "teacher must be one of"),
])
def test_heal_config_refuses_bad_values_in_one_line(options, message):
    with pytest.raises(ConfigError, match=message):
        lorp_fx.HealConfig(**options)


def test_healing_text_too_short_for_one_batch_is_refused_before_training(monkeypatch):
    monkeypatch.setattr(Distillation, "training_step", lambda *a: pytest.fail("trained"))
    student, teacher = pair()
    with pytest.raises(CalibrationError, match="too short for one batch"):
        heal(student, teacher, data=windows(7))  # 4 per batch + 4 held out


def test_the_teacher_must_be_the_dense_model():
    student, teacher = pair()
    with pytest.raises(ConfigError, match="not the pruned model itself"):
        heal(student, student)
    with pytest.raises(ConfigError, match="layers"):
        lorp_fx.heal(student, teacher, windows(), config(), plan=PruningPlan(remove=["model.layers.2"], method="m"),
                     progress=False)


def test_a_bf16_model_heals_through_autocast_and_stays_bf16():
    student, teacher = pair()
    student, teacher = student.to(torch.bfloat16), teacher.to(torch.bfloat16)
    result = heal(student, teacher)
    assert result.report["precision"] == "bf16-mixed"
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}


def test_precision_follows_the_device_and_the_weights(monkeypatch):
    from lorp_fx.healing import config as healing_config

    auto, cpu, cuda = config(precision="auto"), torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a: True)
    assert healing_config.lightning_precision(auto, cuda, torch.float32) == "bf16-mixed"
    assert healing_config.lightning_precision(auto, cuda, torch.float16) == "16-mixed"
    assert healing_config.lightning_precision(config(precision="32"), cpu, torch.float32) == "32-true"
    assert healing_config.lightning_precision(config(precision="32"), cpu, torch.bfloat16) == "bf16-mixed"
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": native})
        assert healing_config.lightning_precision(auto, cpu, torch.float32) == ("bf16-mixed" if native else "32-true")


def test_the_chunked_kl_and_its_gradient_equal_the_plain_ones():
    import torch.nn.functional as F

    from lorp_fx.healing import module

    generator = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(2, 300, 50, generator=generator, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(2, 300, 50, generator=generator, dtype=torch.float64)
    plain = F.kl_div(F.log_softmax(student.flatten(0, 1), -1), F.log_softmax(teacher.flatten(0, 1), -1),
                     log_target=True, reduction="batchmean")
    (expected,) = torch.autograd.grad(plain, student)
    chunked = module.distillation_loss(student, teacher)
    (gradient,) = torch.autograd.grad(chunked, student)
    # float32 inside: the loss and gradient to float32 rounding of sums over 50 words and 600 tokens
    torch.testing.assert_close(chunked.double(), plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gradient, expected, rtol=1e-4, atol=1e-7)


def test_the_hidden_state_term_compares_the_states_where_the_stream_leaves_each_gap():
    from lorp_fx.healing.gaps import match_points
    from lorp_fx.healing.teacher import Teacher

    plan = PruningPlan(remove=["model.layers.2", "model.layers.3", "model.layers.5"], method="manual")
    teacher = tiny_model("llama", 6)
    student = remove_layers(teacher, plan).model
    points = match_points(student, teacher, plan)
    # dense 0 1 | 2 3 | 4 | 5 |: the stream leaves the first gap into layer 4 (pruned: 2), the second at the end
    assert points == [((teacher.model.layers[4], "pre"), (student.model.layers[2], "pre")),
                      ((teacher.model.layers[5], "out"), (student.model.layers[2], "out"))]
    data = windows(2)
    _, dense_states = Teacher(teacher, [t for t, _ in points]).run(data)
    _, pruned_states = Teacher(student, [s for _, s in points]).run(data)
    # Layers 0 and 1 are the same in both: the pruned stream enters layer 4's place as the dense one entered layer 2.
    _, entering = Teacher(teacher, [(teacher.model.layers[2], "pre")]).run(data)
    torch.testing.assert_close(pruned_states[0], entering[0], rtol=0, atol=0)
    assert not torch.allclose(pruned_states[0], dense_states[0])


def test_no_held_out_windows_means_no_held_out_perplexity():
    student, teacher = pair()
    report = heal(student, teacher, held_out=0).report
    assert report["held_out"] == {"windows": 0}
    from lorp_fx.healing.plot import healing_curve

    assert healing_curve(report)[:4] == b"\x89PNG"
