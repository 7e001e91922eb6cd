"""Mistakes that depend only on what the user passed are refused before the work that would reveal them late:
selector option values when the config is made, protected blocks right after the trace (before the calibration
text is sampled or read), a plan that removes nothing, and a plan path in a folder that is not there."""

from __future__ import annotations

import json

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

    monkeypatch.setattr(run, "calibration_text", never)
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
    said = [line for line in err if "lorp-fx" in line or "Traceback" in line]  # progress bars aside
    assert len(said) == 1 and err[-1].startswith("lorp-fx: error:"), err
    return err[-1]


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


# ----------------------------------------------------------------------------- broken GGUF files


def gguf_eval_error(path, tmp_path, capsys) -> str:
    text = tmp_path / "text.txt"
    text.write_text("hello world the then " * 400)
    return cli_error(["eval", "--model", path, "--eval-file", text, "--eval-seq-len", 16, "--eval-samples", 2], capsys)


@pytest.mark.parametrize("keep", [1 / 3, 3000])
def test_a_truncated_gguf_file_is_called_truncated(tmp_path, capsys, keep):
    from gguf_files import write_tiny_gguf

    data = write_tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    assert "is truncated" in gguf_eval_error(cut, tmp_path, capsys)


def test_a_gguf_tensor_of_the_wrong_shape_is_named(tmp_path, capsys, monkeypatch):
    import gguf_files

    wrong = (gguf_files.KV_HEADS * gguf_files.HEAD_DIM + 32, gguf_files.HIDDEN)
    monkeypatch.setattr(gguf_files, "LLAMA_LAYER_TENSORS", {**gguf_files.LLAMA_LAYER_TENSORS, "attn_v": wrong})
    message = gguf_eval_error(gguf_files.write_tiny_gguf(tmp_path / "wrong.gguf", n_layers=2), tmp_path, capsys)
    assert "of the wrong shape (model.layers.0.self_attn.v_proj.weight" in message and "above report" not in message


def test_a_gguf_error_that_ends_in_a_colon_keeps_its_reason(tmp_path, capsys):
    from gguf_files import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "kv.gguf", n_layers=2, per_layer={"attention.head_count_kv": [2, 2]})
    message = gguf_eval_error(path, tmp_path, capsys)
    assert "num_key_value_heads" in message and not message.endswith(":")


def test_an_offloaded_model_with_a_tied_head_saves_the_head_once(tmp_path, capsys):
    """accelerate's hooks put new meta tensors in each module after every forward pass, which untied the head:
    the offloaded save wrote lm_head.weight as a tensor of its own, and the report counted it twice. No
    compensation, so that every saved tensor is a copy of a loaded one and the two saves must agree bit for bit
    (compensated weights are fitted through another computation when offloaded and agree only to float
    tolerance; test_compensation_guard compares those)."""
    import transformers
    from safetensors.torch import load_file
    from tiny_models import TINY, tiny_tokenizer

    from lorp_fx import cli

    config = TINY["llama"].config(4)
    config.tie_word_embeddings = True
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(3000)))
    common = ["prune", "--model", tmp_path / "model", "--remove", 1, "--method", "shortgpt", "--calib-file", text,
              "--seq-len", 16, "--calib-samples", 4, "--compensate", "none"]
    assert cli.main([str(a) for a in [*common, "--out", tmp_path / "memory"]]) == 0
    assert cli.main([str(a) for a in [*common, "--out", tmp_path / "disk", "--device-map", "auto",
                                      "--max-memory", "cpu=1KB"]]) == 0
    in_memory, offloaded = (load_file(tmp_path / out / "model.safetensors") for out in ("memory", "disk"))
    assert "lm_head.weight" not in offloaded and sorted(offloaded) == sorted(in_memory)
    assert all(torch.equal(offloaded[k], in_memory[k]) for k in in_memory)
    reports = [json.loads((tmp_path / out / "report.json").read_text()) for out in ("memory", "disk")]
    for key in ("parameters_before", "parameters_after"):
        assert reports[0][key] == reports[1][key]
