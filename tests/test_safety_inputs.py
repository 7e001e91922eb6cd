"""Bad inputs, one finding of issue 13 a test: no foreign code, no silently wrong model, every check first.

Command-line cases assert one line and exit 2, and that the refusal came before any
work: no progress bar of calibration, statistics or evaluation was printed.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from saved_models import saved_tiny
from tiny_models import FAMILIES, TINY, tiny_model, tiny_tokenizer

from lorp_fx import cli
from lorp_fx.core.errors import LoRPError, ModelLoadError
from lorp_fx.io.models import load_model, resolve_model
from lorp_fx.judge.perplexity import exp_or_inf, perplexity

TEXT = " ".join(f"w{i % 90}" for i in range(3000))
WORK_MARKERS = ("self-calibration", "statistics", "perplexity", "calibration-loss", "compensat")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text(TEXT)
    return path


def save_tiny(tmp_path, family="llama", layers=4, name=None):
    return saved_tiny(tmp_path, family, layers, name=name or family)


def edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def run(args, capsys):
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused_before_work(code, err, *fragments):
    errors = [line for line in err.strip().splitlines() if "lorp-fx: error:" in line]
    assert code == 2 and len(errors) == 1 and err.strip().endswith(errors[0]), err
    assert "Traceback" not in err and not any(m in err for m in WORK_MARKERS), err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def prune_args(model, text_file, out, *extra):
    return ["prune", "--model", model, "--remove", 1, "--method", "shortgpt", "--calib-file", text_file,
            "--calib-samples", 2, "--seq-len", 16, "--out", out, *extra]


# --------------------------------------------------------------------------- no foreign code


def with_own_code(tmp_path, where: str) -> tuple[Path, Path]:
    """A tiny Llama directory whose `where` (config.json or tokenizer_config.json) names working Python code
    of its own (model_type "evil", which transformers does not know) that leaves a sentinel file when it runs."""
    model_dir = save_tiny(tmp_path)
    sentinel = tmp_path / "the-model-code-ran"
    touch = f"import pathlib\npathlib.Path({str(sentinel)!r}).touch()\n"
    (model_dir / "configuration_evil.py").write_text(
        touch + "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    (model_dir / "modeling_evil.py").write_text(
        touch + "from transformers import LlamaForCausalLM\nfrom .configuration_evil import EvilConfig\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    (model_dir / "tokenization_evil.py").write_text(
        touch + "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    if where == "config.json":
        edit_json(model_dir / where, model_type="evil", architectures=["EvilForCausalLM"], auto_map={
            "AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    else:
        edit_json(model_dir / where, tokenizer_class="EvilTokenizer",
                  auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})
    return model_dir, sentinel


def test_a_model_with_its_own_code_is_refused_with_yes_on_stdin(tmp_path, text_file):
    """`yes y | lorp-fx prune ...` used to answer transformers' prompt and run the model's code."""
    model_dir, sentinel = with_own_code(tmp_path, "config.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(cli.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "lorp_fx.cli", *map(str, prune_args(model_dir, text_file, tmp_path / "out"))],
        input="y\n" * 1000, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 2, result.stderr
    assert "never runs a model's code" in result.stderr and "[y/N]" not in result.stdout + result.stderr
    assert not sentinel.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("command", ["prune", "analyze", "eval"])
def test_own_code_in_config_or_tokenizer_is_refused_by_every_command(tmp_path, capsys, text_file, monkeypatch, where, command):
    import io

    model_dir, sentinel = with_own_code(tmp_path, where)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 1000))
    args = {
        "prune": prune_args(model_dir, text_file, tmp_path / "out"),
        "analyze": ["analyze", "--model", model_dir, "--calib-file", text_file, "--seq-len", 16, "--out", tmp_path / "out"],
        "eval": ["eval", "--model", model_dir, "--eval-file", text_file, "--eval-seq-len", 16],
    }[command]
    code, _, err = run(args, capsys)
    assert_refused_before_work(code, err, "auto_map", "never runs a model's code", where)
    assert not sentinel.exists()


def test_pickled_weights_load_only_as_tensors(tmp_path):
    model_dir = save_tiny(tmp_path)
    (model_dir / "model.safetensors").unlink()
    sentinel = tmp_path / "the-pickle-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    torch.save({"model.embed_tokens.weight": Payload()}, model_dir / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_model(model_dir)
    assert not sentinel.exists()


def test_plain_pickled_tensors_still_load(tmp_path):
    model_dir = save_tiny(tmp_path)
    state = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    torch.save(state, model_dir / "pytorch_model.bin")
    model, _ = load_model(model_dir)
    assert torch.equal(model.state_dict()["model.layers.0.mlp.down_proj.weight"], state["model.layers.0.mlp.down_proj.weight"])


# --------------------------------------------------------------------------- no silently wrong model


def rewrite_tensors(model_dir: Path, change):
    state = load_file(model_dir / "model.safetensors")
    change(state)
    save_file(state, model_dir / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("change, fragment", [
    (lambda s: s.pop("model.layers.1.mlp.down_proj.weight"), "1 missing (model.layers.1.mlp.down_proj.weight)"),
    (lambda s: s.update({"model.extra.weight": torch.zeros(2)}), "1 unexpected (model.extra.weight)"),
    (lambda s: s.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}), "1 of the wrong shape (model.layers.0.mlp.up_proj.weight)"),
])
def test_missing_unexpected_or_mismatched_tensors_are_an_error_naming_them(tmp_path, capsys, text_file, change, fragment):
    model_dir = save_tiny(tmp_path)
    rewrite_tensors(model_dir, change)
    with pytest.raises(ModelLoadError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_model(model_dir)
    code, _, err = run(prune_args(model_dir, text_file, tmp_path / "out"), capsys)
    assert_refused_before_work(code, err, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_reloads_with_every_tensor_accounted_for(tmp_path, family):
    model_dir = save_tiny(tmp_path, family, layers=TINY[family].depth)
    loaded, _ = load_model(model_dir)
    original = tiny_model(family, layers=TINY[family].depth).state_dict()
    assert all(torch.equal(original[k], v) for k, v in loaded.state_dict().items())


def test_an_architecture_of_another_family_is_refused_before_the_weights_load(tmp_path, capsys, text_file):
    model_dir = save_tiny(tmp_path)
    edit_json(model_dir / "config.json", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel .* model_type is 'llama'"):
        resolve_model(model_dir)
    code, _, err = run(prune_args(model_dir, text_file, tmp_path / "out"), capsys)
    assert_refused_before_work(code, err, "wrong model")


def test_an_architecture_transformers_does_not_have_is_refused(tmp_path):
    model_dir = save_tiny(tmp_path)
    edit_json(model_dir / "config.json", architectures=["LlamaForTimeTravel"])
    with pytest.raises(ModelLoadError, match="LlamaForTimeTravel.*does not have"):
        resolve_model(model_dir)


def save_base_model(tmp_path, tied: bool) -> tuple[Path, transformers.LlamaModel]:
    config = TINY["llama"].config(3)
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    base = transformers.LlamaModel(config).eval()
    path = tmp_path / f"base-{tied}"
    base.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaModel"]
    return path, base


def test_a_base_model_without_a_head_is_refused_naming_the_head(tmp_path, capsys, text_file):
    path, _ = save_base_model(tmp_path, tied=False)
    with pytest.raises(ModelLoadError, match=r"missing \(lm_head.weight\).*base model LlamaModel"):
        load_model(path)
    code, _, err = run(prune_args(path, text_file, tmp_path / "out"), capsys)
    assert_refused_before_work(code, err, "lm_head.weight")


@pytest.mark.numeric
def test_a_base_model_with_tied_embeddings_loads_as_its_language_model(tmp_path):
    """The head of a tied model is its embedding matrix: nothing is missing, and the logits are exact."""
    path, base = save_base_model(tmp_path, tied=True)
    model, _ = load_model(path)
    assert isinstance(model, transformers.LlamaForCausalLM)
    ids = torch.tensor([[1, 5, 9, 13, 40]])
    with torch.no_grad():
        expected = base(ids).last_hidden_state @ base.embed_tokens.weight.T
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)


# --------------------------------------------------------------------------- names that are not paths


@pytest.fixture
def no_network(monkeypatch):
    """Every outgoing connection attempt is recorded and refused."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return attempts


def test_a_typo_in_a_model_name_fails_at_once_without_the_network(no_network, capsys, tmp_path):
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="'lamma' is not a local path.*org/name"):
        load_model("lamma")
    code, _, err = run(["eval", "--model", "lamma", "--eval-file", tmp_path / "missing.txt"], capsys)
    assert code == 2  # (the missing eval file is found first: files before the model)
    code, _, err = run(["analyze", "--model", "lamma", "--out", tmp_path / "o"], capsys)
    assert_refused_before_work(code, err, "not a local path")
    assert no_network == [] and time.monotonic() - start < 10


def test_a_hub_id_offline_and_not_cached_fails_at_once(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local cache and HF_HUB_OFFLINE"):
        resolve_model("some-org/some-model-that-is-not-cached")
    assert no_network == []


def test_a_path_typo_under_an_existing_directory_is_a_missing_path(tmp_path, monkeypatch, no_network):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model("models/lamma")
    assert no_network == []


def test_a_bare_name_in_the_hub_cache_loads_offline(tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--tinyllama" / "snapshots" / "0123"
    save_tiny(snapshot.parent, name=snapshot.name)
    (tmp_path / "hub" / "models--tinyllama" / "refs").mkdir()
    (tmp_path / "hub" / "models--tinyllama" / "refs" / "main").write_text("0123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_model("tinyllama")
    assert source.kind == "hub" and snapshot in source.paths
    model, _ = load_model("tinyllama")
    assert isinstance(model, transformers.LlamaForCausalLM) and no_network == []


# --------------------------------------------------------------------------- numbers and lengths, before any work


@pytest.mark.parametrize("command, flag, value", [
    ("prune", "--seed", -1), ("prune", "--batch-size", 0), ("prune", "--calib-samples", 0), ("prune", "--seq-len", 1),
    ("prune", "--loss-windows", 0), ("prune", "--eval-samples", 0), ("analyze", "--seed", -1),
    ("analyze", "--batch-size", 0), ("eval", "--batch-size", 0), ("eval", "--eval-samples", 0), ("eval", "--eval-seq-len", 1),
])
def test_bad_numbers_are_one_line_naming_the_flag(tmp_path, capsys, text_file, command, flag, value):
    model_dir = save_tiny(tmp_path)
    args = {
        "prune": prune_args(model_dir, text_file, tmp_path / "out"),
        "analyze": ["analyze", "--model", model_dir, "--calib-file", text_file, "--seq-len", 16, "--out", tmp_path / "out"],
        "eval": ["eval", "--model", model_dir, "--eval-file", text_file, "--eval-seq-len", 16],
    }[command]
    code, _, err = run([*args, flag, value], capsys)
    assert_refused_before_work(code, err, flag, ">=")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, args", [
    ("gpt2", ["--seq-len", 65]),                                   # GPT-2's learned positions: n_positions 64
    ("llama", ["--seq-len", 100]),                                 # above max_position_embeddings (RoPE: was silent)
    ("llama", ["--seq-len", 16, "--eval-file", "TEXT", "--eval-seq-len", 65]),
])
def test_a_window_longer_than_the_model_positions_is_refused(tmp_path, capsys, text_file, family, args):
    model_dir = save_tiny(tmp_path, family)
    args = [text_file if a == "TEXT" else a for a in args]
    code, _, err = run(["prune", "--model", model_dir, "--remove", 1, "--calib-file", text_file, "--calib-samples", 2,
                        "--out", tmp_path / "out", *args], capsys)
    assert_refused_before_work(code, err, "longer than the 64 positions", "or less")


def test_eval_longer_than_the_model_positions_is_refused(tmp_path, capsys, text_file):
    code, _, err = run(["eval", "--model", save_tiny(tmp_path, "gpt2"), "--eval-file", text_file, "--eval-seq-len", 65], capsys)
    assert_refused_before_work(code, err, "--eval-seq-len 65", "64 positions")


def test_eval_with_a_tokenizer_larger_than_the_model_vocabulary(tmp_path, capsys):
    model_dir = save_tiny(tmp_path)
    tiny_tokenizer(size=300).save_pretrained(model_dir)  # ids beyond the model's 97 embeddings
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{200 + i % 90}" for i in range(2000)))
    code, _, err = run(["eval", "--model", model_dir, "--eval-file", text, "--eval-samples", 2, "--eval-seq-len", 16], capsys)
    assert_refused_before_work(code, err, "do not match", "97 embeddings")


def test_perplexity_refuses_ids_beyond_the_embeddings_before_running_the_model():
    model = tiny_model("llama")
    with pytest.raises(LoRPError, match="do not match"):
        perplexity(model, torch.tensor([[1, 2, 500]]), progress=False)
    with pytest.raises(LoRPError, match="batch_size"):
        perplexity(model, torch.tensor([[1, 2, 3]]), batch_size=0, progress=False)


@pytest.mark.parametrize("eval_text, fragment", [(None, "does not exist"), ("w1 w2 w3", "has 3 tokens")])
def test_a_missing_or_short_eval_file_is_refused_before_any_work(tmp_path, capsys, text_file, eval_text, fragment):
    eval_file = tmp_path / "test.txt"
    if eval_text is not None:
        eval_file.write_text(eval_text)
    code, _, err = run(prune_args(save_tiny(tmp_path), text_file, tmp_path / "out", "--eval-file", eval_file,
                                  "--eval-samples", 2, "--eval-seq-len", 16), capsys)
    assert_refused_before_work(code, err, fragment)


def test_an_output_under_a_file_is_refused_before_any_work(tmp_path, capsys, text_file):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(prune_args(save_tiny(tmp_path), text_file, blocker / "sub" / "run"), capsys)
    assert_refused_before_work(code, err, "is a file, not a directory")


@pytest.mark.parametrize("kind", ["dangling", "too-long"])
def test_a_dangling_link_or_an_over_long_name_as_out(tmp_path, capsys, text_file, kind):
    out = tmp_path / ("x" * 300)
    if kind == "dangling":
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "nowhere")
    code, _, err = run(prune_args(save_tiny(tmp_path), text_file, out), capsys)
    assert_refused_before_work(code, err, "does not exist" if kind == "dangling" else "bytes")


# --------------------------------------------------------------------------- a confident model


def test_perplexity_beyond_the_float_range_is_inf():
    assert exp_or_inf(800.0) == math.inf and exp_or_inf(1.0) == pytest.approx(math.e)

    def confident(input_ids):  # certain of token 0, never right
        logits = torch.zeros(*input_ids.shape, 5)
        logits[..., 0] = 1e4
        return logits

    assert perplexity(confident, torch.tensor([[1, 2, 3, 4]]), progress=False) == math.inf


def test_a_confident_model_still_gets_its_pruned_output_saved(tmp_path, capsys, text_file):
    model_dir = tmp_path / "confident"
    model = tiny_model("llama", layers=4)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    code, stdout, err = run(prune_args(model_dir, text_file, out, "--eval-file", text_file, "--eval-samples", 2,
                                       "--eval-seq-len", 16, "--compensate", "none"), capsys)
    assert code == 0, err
    evaluation = json.loads((out / "report.json").read_text())["evaluation"]
    assert math.isinf(evaluation["ppl_before"]) and "inf" in stdout


def test_the_library_refuses_windows_beyond_the_positions_too():
    from lorp_fx import PruneConfig, prune_model
    from lorp_fx.core.errors import ConfigError

    model = tiny_model("gpt2", layers=4)
    with pytest.raises(ConfigError, match="longer than the model's 64 positions"):
        prune_model(model, torch.randint(4, 90, (2, 65)), PruneConfig(remove=1, method="shortgpt"), progress=False)
    with pytest.raises(ConfigError, match="evaluation windows of 80 tokens"):
        prune_model(model, torch.randint(4, 90, (2, 16)), PruneConfig(remove=1, method="shortgpt"),
                    evaluation=torch.randint(4, 90, (2, 80)), progress=False)


@pytest.mark.parametrize("budget, words", [
    ([], "give exactly one budget: --remove K"),
    (["--remove", "0"], "--remove must be a whole number >= 1, got 0"),
    (["--ratio", "1.5"], "--ratio must be a fraction strictly between 0 and 1, got 1.5"),
])
def test_a_bad_budget_names_its_flag(budget, words, tmp_path, capsys):
    from lorp_fx.cli import main

    assert main(["prune", *budget, "--out", str(tmp_path / "out")]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sublayers_of_a_whole_layer_family_are_refused_before_the_weights_load(tmp_path, capsys, text_file, monkeypatch):
    """BERT (post-norm) loses whole layers only: refused from its config, before loading, sampling or statistics."""
    model_dir = save_tiny(tmp_path, "bert")
    monkeypatch.setattr("lorp_fx.cli.commands.load_placed", lambda *a, **k: pytest.fail("the weights were loaded"))
    code, _, err = run(prune_args(model_dir, text_file, tmp_path / "out", "--granularity", "sublayer"), capsys)
    assert_refused_before_work(code, err, "post-norm", "--granularity layer")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("compensate", ["auto", "none"])
def test_the_library_refuses_sublayers_of_a_whole_layer_family_before_any_forward(compensate):
    from lorp_fx import prune_model
    from lorp_fx.core.errors import NotRemovableError
    from lorp_fx.pipeline.config import PruneConfig

    model = tiny_model("bert", layers=6)
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    windows = torch.randint(2, 90, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(NotRemovableError, match="post-norm.*granularity='layer'"):
        prune_model(model, windows, PruneConfig(remove=2, granularity="sublayer", compensate=compensate), progress=False)
    assert forwards == []
