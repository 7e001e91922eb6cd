"""Mistakes that depend only on what the user passed are refused before the work that would reveal them late:
selector option values when the config is made, protected blocks right after the trace (before the calibration
text is sampled or read), a plan that removes nothing, and a plan path in a folder that is not there."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import lorp_fx
import lorp_fx.pipeline.run as run
from lorp_fx.core.errors import ConfigError, SelectorError, UnknownBlockError

WINDOWS = torch.randint(4, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("options, error, message", [
    ({"width": -3}, SelectorError, "width=-3 must be a whole number of candidates"),
    ({"width": 1}, SelectorError, "at least 2"),
    ({"width": 2.5}, SelectorError, "width=2.5"),
    ({"max_evaluations": 0}, SelectorError, "max_evaluations=0"),
    ({"protected": 1.5}, ConfigError, "protected must be a block name or index"),
])
def test_selector_option_values_are_refused_when_the_config_is_made(options, error, message):
    with pytest.raises(error, match=message):
        lorp_fx.PruneConfig(remove=1, selector_options=options)


@pytest.mark.parametrize("protected", [["model.layers.9"], [7], "layers.1"])
def test_an_unknown_protected_block_is_refused_before_any_calibration(monkeypatch, protected):
    def never(*args, **kwargs):
        raise AssertionError("calibration text was read or sampled before the protected blocks were checked")

    monkeypatch.setattr(run, "calibration_windows", never)
    config = lorp_fx.PruneConfig(remove=1, calib_samples=8, seq_len=16, selector_options={"protected": protected})
    with pytest.raises(UnknownBlockError, match="protected block"):
        lorp_fx.prune_model(tiny_model("llama"), WINDOWS, config, progress=False)


def test_known_protected_blocks_are_kept():
    config = lorp_fx.PruneConfig(remove=2, calib_samples=8, seq_len=16, loss_windows=2, compensate="none",
                                 selector_options={"protected": ["model.layers.1", -1]})
    result = lorp_fx.prune_model(tiny_model("llama"), WINDOWS, config, progress=False)
    assert "model.layers.1" not in result.plan.remove and "model.layers.4" not in result.plan.remove


# ----------------------------------------------------------------------------- loading and saving, in one line


def saved_tiny(folder, tokenizer: bool = True, config: bool = True):
    from tiny_models import tiny_tokenizer

    tiny_model("llama", layers=3).save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    if not config:
        (folder / "config.json").unlink()
    return folder


def cli_error(args, capsys) -> str:
    from lorp_fx import cli

    capsys.readouterr()
    assert cli.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorp-fx: error:"), err
    return err[0]


def test_a_folder_without_config_json_says_it_is_not_a_checkpoint(tmp_path, capsys):
    model = saved_tiny(tmp_path / "model", config=False)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(3000)))
    assert "has no config.json" in cli_error(["eval", "--model", model, "--eval-file", text], capsys)


def test_a_folder_without_tokenizer_files_says_so(tmp_path, capsys):
    model = saved_tiny(tmp_path / "model", tokenizer=False)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(3000)))
    assert "has no tokenizer files" in cli_error(["eval", "--model", model, "--eval-file", text, "--eval-seq-len", 16],
                                                 capsys)


def test_an_output_inside_the_model_folder_is_refused_like_an_offload_dir_there(tmp_path, capsys):
    model = saved_tiny(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(3000)))
    before = sorted(p.name for p in model.iterdir())
    message = cli_error(["prune", "--model", model, "--remove", 1, "--calib-file", text, "--seq-len", 16,
                         "--out", model / "pruned"], capsys)
    assert "lies inside" in message and "input directory" in message
    assert sorted(p.name for p in model.iterdir()) == before


@pytest.mark.parametrize("arguments, message", [
    (lambda model, tokenizer, out: (out, tokenizer, model), "model first"),       # PruneResult.save's order
    (lambda model, tokenizer, out: (model, 3, out), "tokenizer must have save_pretrained"),
    (lambda model, tokenizer, out: (model, tokenizer, 3), "out_dir must be a path"),
])
def test_save_pretrained_atomic_refuses_arguments_in_another_order(tmp_path, arguments, message):
    from tiny_models import tiny_tokenizer

    from lorp_fx.core.errors import CallError

    with pytest.raises(CallError, match=message):
        lorp_fx.save_pretrained_atomic(*arguments(tiny_model("llama", layers=2), tiny_tokenizer(), tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_a_graph_called_with_use_cache_gives_advice_that_works():
    from lorp_fx.core.errors import FixedArgumentError

    model = tiny_model("llama", layers=2)
    graph = lorp_fx.trace(model, {"input_ids": WINDOWS[:2], "use_cache": False})
    with pytest.raises(FixedArgumentError, match="without a KV cache") as raised:
        graph(input_ids=WINDOWS[:2], use_cache=True)
    assert "trace again" not in str(raised.value)
