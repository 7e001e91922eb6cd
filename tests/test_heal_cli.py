"""`lorp-fx prune --heal`: the healed checkpoint and its report, GGUF output, recipes, and every bad input as
one line with exit 2 before any training."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import TEXT, assert_clean_failure, run, save_tiny
from transformers import AutoModelForCausalLM

from lorp_fx.arch.surgery import count_parameters
from lorp_fx.healing.module import Distillation


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text(TEXT)
    return path


def prune_args(model_dir, text_file, out, *extra):
    return ["prune", "--model", model_dir, "--remove", 2, "--method", "shortgpt", "--compensate", "none", "--calib-file",
            text_file, "--calib-samples", 4, "--seq-len", 16, "--out", out, "--heal", "--heal-steps", 4, "--heal-batch-size", 2,
            "--heal-seq-len", 16, "--heal-held-out", 2, "--heal-lr", "3e-3", *extra]


@pytest.mark.heatmap  # reads similarity.png
def test_prune_heal_writes_the_healed_checkpoint_its_report_and_curve(tmp_path, capsys, text_file):
    model_dir, out = save_tiny(tmp_path, "llama", layers=5), tmp_path / "out"
    code, stdout, err = run(prune_args(model_dir, text_file, out, "--eval-file", text_file, "--eval-samples", 2,
                                       "--eval-seq-len", 16), capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    healing = report["healing"]
    assert healing["steps"] == 4 and healing["tokens"] == 4 * 2 * 16 and healing["train"] == "gaps"
    assert [point[0] for point in healing["loss_curve"]] == [1, 2, 3, 4]
    assert {"ppl_dense", "ppl_before", "ppl_after"} <= set(healing["held_out"])
    assert healing["passes"] > 0 and report["timings_in_passes"]["healing"] == healing["passes"]
    assert "ppl_healed" in report["evaluation"] and "healing" in stdout
    assert (out / "healing.png").read_bytes()[:4] == b"\x89PNG" and (out / "similarity.png").exists()
    healed = AutoModelForCausalLM.from_pretrained(out)
    assert count_parameters(healed) == report["parameters_after"]
    assert not (tmp_path / "out.healing").exists()  # the checkpoint of a run that ended well is gone
    recipe = (out / "recipe.yaml").read_text()
    assert "heal: true" in recipe and "heal_steps: 4" in recipe


def test_a_recipe_heals_as_the_flags_do(tmp_path, capsys, text_file):
    model_dir = save_tiny(tmp_path, "llama", layers=5)
    assert run(prune_args(model_dir, text_file, tmp_path / "a"), capsys)[0] == 0
    code, _, err = run(["prune", "--config", tmp_path / "a" / "recipe.yaml", "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("steps, message", [("-3", "--heal-steps must be a whole number >= 1, got -3"),
                                            ("ten", "--heal-steps must be a whole number >= 1, got 'ten'"),
                                            ("2.5", "--heal-steps must be a whole number")])
def test_bad_heal_steps_are_one_line(tmp_path, capsys, text_file, steps, message):
    model_dir = save_tiny(tmp_path, "llama", layers=5)
    args = prune_args(model_dir, text_file, tmp_path / "o")
    args[args.index("--heal-steps") + 1] = steps
    code, _, err = run(args, capsys)
    assert_clean_failure(code, err, message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags", [["--heal-steps", "500"], ["--heal-train", "lora", "--heal-lr", "1e-4"]])
def test_a_healing_flag_without_heal_is_one_line_not_ignored(tmp_path, capsys, text_file, flags):
    """`--heal-steps 500` alone would otherwise prune without healing and exit 0."""
    model_dir = save_tiny(tmp_path, "llama", layers=5)
    args = [a for a in prune_args(model_dir, text_file, tmp_path / "o") if a != "--heal"]
    args = args[: args.index("--heal-steps")] + flags
    code, _, err = run(args, capsys)
    assert_clean_failure(code, err, f"{flags[0]}")
    assert "add --heal" in err and not (tmp_path / "o").exists()


def test_a_recipe_of_a_run_without_healing_reruns_whatever_its_healing_values(tmp_path, capsys, text_file):
    """A recipe records every option, the healing ones at the defaults of the version that wrote it: with
    `heal: false` they are inert (an older default must not turn into "add --heal"), and --heal turns them on."""
    model_dir = save_tiny(tmp_path, "llama", layers=5)
    args = [a for a in prune_args(model_dir, text_file, tmp_path / "a") if a != "--heal"]
    args = args[: args.index("--heal-steps")]
    assert run(args, capsys)[0] == 0
    recipe = tmp_path / "a" / "recipe.yaml"
    text = recipe.read_text().replace("heal_batch_size: 2", "heal_batch_size: 4").replace("heal_steps: 300", "heal_steps: 3")
    assert "heal: false" in text and "heal_batch_size: 4" in text
    recipe.write_text(text)
    assert run(["prune", "--config", recipe, "--out", tmp_path / "b"], capsys)[0] == 0
    code, _, err = run(["prune", "--config", recipe, "--out", tmp_path / "c", "--heal", "--heal-seq-len", 16,
                        "--heal-held-out", 2], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "c" / "report.json").read_text())["healing"]["steps"] == 3


@pytest.mark.parametrize("family", ["t5", "bert"])
def test_healing_a_model_that_predicts_no_next_token_is_refused_before_pruning(tmp_path, capsys, text_file, family,
                                                                                monkeypatch):
    """An encoder-decoder or a masked LM cannot be distilled token by token: said once the weights are loaded,
    not after the whole calibration and selection have run."""
    import lorp_fx.cli.commands as commands

    monkeypatch.setattr(commands, "prune_model", lambda *a, **k: pytest.fail("pruned before refusing"))
    args = prune_args(save_tiny(tmp_path, family, layers=4), text_file, tmp_path / "o")
    code, _, err = run(args, capsys)
    assert_clean_failure(code, err, "does not model: heal causal language models")
    assert not (tmp_path / "o").exists()


def test_healing_text_too_short_for_one_batch_is_refused_before_the_weights_load(tmp_path, capsys, text_file, monkeypatch):
    monkeypatch.setattr(Distillation, "training_step", lambda *a: pytest.fail("trained"))
    model_dir, short = save_tiny(tmp_path, "llama", layers=5), tmp_path / "short.txt"
    short.write_text(" ".join(f"w{i}" for i in range(60)))
    code, _, err = run(prune_args(model_dir, text_file, tmp_path / "o", "--heal-file", short), capsys)
    assert_clean_failure(code, err, "too short for one batch")


def test_lora_without_peft_names_the_install_command(tmp_path, capsys, text_file, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    model_dir = save_tiny(tmp_path, "llama", layers=5)
    code, _, err = run(prune_args(model_dir, text_file, tmp_path / "o", "--heal-train", "lora"), capsys)
    assert_clean_failure(code, err, "pip install peft")


def interrupt_at_step(monkeypatch, at: int):
    step = Distillation.training_step

    def interrupted(self, batch, batch_idx):
        if self.global_step == at:
            raise KeyboardInterrupt
        return step(self, batch, batch_idx)

    monkeypatch.setattr(Distillation, "training_step", interrupted)
    return step


def test_an_interrupted_heal_writes_nothing_and_resumes_from_its_checkpoint(tmp_path, capsys, text_file, monkeypatch):
    model_dir, out = save_tiny(tmp_path, "llama", layers=5), tmp_path / "out"
    assert run(prune_args(model_dir, text_file, tmp_path / "reference"), capsys)[0] == 0
    step = interrupt_at_step(monkeypatch, 2)
    code, _, err = run(prune_args(model_dir, text_file, out), capsys)
    checkpoint = tmp_path / "out.healing" / "last.ckpt"
    assert code == 130 and not out.exists() and checkpoint.is_file()
    assert f"--heal-resume {checkpoint}" in err.strip().splitlines()[-1]
    monkeypatch.setattr(Distillation, "training_step", step)
    code, _, err = run(prune_args(model_dir, text_file, out, "--heal-resume", checkpoint), capsys)
    assert code == 0, err
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "reference").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_resuming_a_checkpoint_of_another_model_or_plan_is_refused_before_training(tmp_path, capsys, text_file,
                                                                                    monkeypatch):
    model_dir = save_tiny(tmp_path, "llama", layers=5)
    step = interrupt_at_step(monkeypatch, 2)
    assert run(prune_args(model_dir, text_file, tmp_path / "first"), capsys)[0] == 130
    checkpoint = tmp_path / "first.healing" / "last.ckpt"
    monkeypatch.setattr(Distillation, "training_step", lambda *a: pytest.fail("trained"))
    other = tmp_path / "other"
    from tiny_models import tiny_model, tiny_tokenizer

    tiny_model("llama", 5, seed=3).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    code, _, err = run(prune_args(other, text_file, tmp_path / "o1", "--heal-resume", checkpoint), capsys)
    assert_clean_failure(code, err, "checkpoint of another model")
    args = prune_args(model_dir, text_file, tmp_path / "o2", "--heal-resume", checkpoint)
    args[args.index("--remove") + 1] = 1
    code, _, err = run(args, capsys)
    assert_clean_failure(code, err, "another pruning plan")
    code, _, err = run(prune_args(model_dir, text_file, tmp_path / "o3", "--heal-resume", tmp_path / "nope.ckpt"), capsys)
    assert_clean_failure(code, err, "does not exist")
    assert step is not None


def test_a_healed_gguf_requantizes_the_changed_tensors_and_copies_the_rest_byte_for_byte(tmp_path, capsys):
    pytest.importorskip("gguf")
    from gguf import GGUFReader
    from gguf_files import write_tiny_gguf

    from lorp_fx.io.models import load_model

    source = write_tiny_gguf(tmp_path / "tiny-llama.gguf")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"the river {i % 17} town {i % 5} ship" for i in range(600)))
    args = ["prune", "--model", source, "--remove", 2, "--method", "shortgpt", "--calib-file", text, "--calib-samples", 4,
            "--seq-len", 16, "--compensate", "none"]
    healing = ["--heal", "--heal-steps", 3, "--heal-batch-size", 2, "--heal-seq-len", 16, "--heal-held-out", 2]
    assert run([*args, "--out", tmp_path / "plain"], capsys)[0] == 0
    code, _, err = run([*args, "--out", tmp_path / "healed", *healing], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "healed" / "report.json").read_text())
    requantized = {entry["tensor"] for entry in report["gguf"]["requantized"]}
    assert len(requantized) == len(report["healing"]["changed_parameters"]) > 0
    plain = {t.name: bytes(t.data.tobytes()) for t in GGUFReader(tmp_path / "plain" / source.name).tensors}
    healed = {t.name: bytes(t.data.tobytes()) for t in GGUFReader(tmp_path / "healed" / source.name).tensors}
    assert set(plain) == set(healed)
    assert all(healed[name] == plain[name] for name in plain if name not in requantized)
    assert all(healed[name] != plain[name] for name in requantized)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        float_logits = load_model(tmp_path / "healed")[0](input_ids=ids).logits
        gguf_logits = load_model(tmp_path / "healed" / source.name)[0](input_ids=ids).logits
    assert (gguf_logits - float_logits).abs().max() < 0.5 * float_logits.abs().max()  # requantization error only
