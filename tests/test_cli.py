"""The command line: prune, analyze and eval on tiny checkpoints and on the real SmolLM2."""

import json

import pytest
import torch
import transformers
from saved_models import saved_tiny
from shared_data import require_shared_data
from tiny_models import tiny_tokenizer

from lorp_fx import cli
from lorp_fx.arch.families import layer_stacks

TEXT = " ".join(f"w{i % 90}" for i in range(3000))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text(TEXT)
    return path


def save_tiny(tmp_path, family, layers=4):
    return saved_tiny(tmp_path, family, layers, name=family)


def run(args, capsys):
    capsys.readouterr()  # drop what the set-up printed
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


AUTO = {"t5": transformers.AutoModelForSeq2SeqLM}


@pytest.mark.heatmap
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "gpt2", "mixtral", "qwen2_moe", "t5"])
def test_prune_writes_a_checkpoint_that_reloads_and_generates(tmp_path, capsys, text_file, family):
    model_dir, out = save_tiny(tmp_path, family), tmp_path / "out"
    code, stdout, stderr = run(
        ["prune", "--model", model_dir, "--remove", 1, "--method", "shortgpt", "--calib-file", text_file,
         "--calib-samples", 4, "--seq-len", 16, "--out", out], capsys,
    )
    assert code == 0, stderr
    assert "removed" in stdout and "parameters" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["layers_after"] == report["layers_before"] - 1
    assert report["parameters_after"] < report["parameters_before"]
    assert (out / "plan.json").exists() and (out / "similarity.png").read_bytes()[:4] == b"\x89PNG"
    assert report["fx_graph_max_abs_logit_difference"] < 1e-4
    # gemma3 normalises the branch output before the add: only a per-channel map folds there
    compensation = report["compensation"]
    assert compensation.get("requested", compensation["method"]) == "cosine" and "skipped" not in compensation
    assert compensation["form"] == ("diagonal" if family == "gemma3" else "full")
    if "calibration_loss" in compensation:  # "auto" folds the maps only where they do not hurt the calibration loss
        loss = compensation["calibration_loss"]
        assert compensation["applied"] == (loss["compensated"] <= loss["uncompensated"]) >= bool(compensation["gaps"])
        assert compensation["method"] == ("cosine" if compensation["gaps"] else "none")
    assert (out / "recipe.yaml").exists() and report["config"]["remove"] == 1
    reloaded = AUTO.get(family, transformers.AutoModelForCausalLM).from_pretrained(out).eval()
    assert sum(len(layers) for _, layers in layer_stacks(reloaded)) == report["layers_after"]
    ids = torch.tensor([[5, 6, 7, 8]])
    generated = reloaded.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
    assert generated.shape[1] >= 4


def test_compensation_keeps_the_parameter_count_and_changes_the_weights(tmp_path, capsys, text_file):
    model_dir = save_tiny(tmp_path, "llama", layers=6)
    reports, states = {}, {}
    for method in ("none", "lstsq", "cosine"):
        out = tmp_path / method
        code, stdout, stderr = run(
            ["prune", "--model", model_dir, "--remove", 2, "--compensate", method, "--calib-file", text_file,
             "--calib-samples", 8, "--seq-len", 16, "--out", out], capsys,
        )
        assert code == 0, stderr
        assert f"compensation  {method}" in stdout
        reports[method] = json.loads((out / "report.json").read_text())
        states[method] = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert {r["parameters_after"] for r in reports.values()} == {reports["none"]["parameters_after"]}
    assert reports["none"]["removed"] == reports["cosine"]["removed"] == reports["lstsq"]["removed"]
    for method in ("lstsq", "cosine"):
        gaps = reports[method]["compensation"]["gaps"]
        assert gaps and all(g["error_after"] < g["error_before"] for g in gaps)
        changed = [k for k in states["none"] if not torch.equal(states["none"][k], states[method][k])]
        assert changed and all(k.endswith(("down_proj.weight", "o_proj.weight")) for k in changed)


def test_an_explicit_compensation_the_family_cannot_take(tmp_path, capsys, text_file):
    out = tmp_path / "out"
    code, _, err = run(["prune", "--model", save_tiny(tmp_path, "bert"), "--remove", 1, "--compensate", "cosine",
                        "--calib-file", text_file, "--calib-samples", 4, "--seq-len", 16, "--out", out], capsys)
    errors = [line for line in err.splitlines() if line.startswith("lorp-fx: error")]
    assert code == 2 and len(errors) == 1 and "without compensation" in errors[0] and "Traceback" not in err
    assert "calibrating" not in err  # refused before the long work
    assert not out.exists()


@pytest.mark.heatmap
def test_analyze_writes_statistics_and_removes_nothing(tmp_path, capsys, text_file):
    model_dir, out = save_tiny(tmp_path, "llama", layers=6), tmp_path / "analysis"
    code, stdout, stderr = run(["analyze", "--model", model_dir, "--calib-file", text_file, "--calib-samples", 4,
                                "--seq-len", 16, "--out", out], capsys)
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert len(report["similarity"]) == 7 and "rls" in report and report["clusters"]
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "similarity.png", "statistics.json"]
    assert "RLS" in stdout


def test_eval_prints_perplexity(tmp_path, capsys, text_file):
    model_dir = save_tiny(tmp_path, "llama")
    code, stdout, _ = run(["eval", "--model", model_dir, "--eval-file", text_file, "--eval-samples", 2,
                           "--eval-seq-len", 16], capsys)
    assert code == 0 and "perplexity" in stdout


# ----------------------------------------------------------------------------- bad input: one line, exit 2


def assert_clean_failure(code, stderr, *fragments):
    assert code == 2
    # Progress bars may come first; the error itself is one line, and the last.
    errors = [line for line in stderr.strip().splitlines() if "lorp-fx: error:" in line]
    assert len(errors) == 1 and stderr.strip().endswith(errors[0].strip()), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_a_model_path_that_does_not_exist(tmp_path, capsys):
    code, _, err = run(["prune", "--model", tmp_path / "nope", "--remove", 1, "--out", tmp_path / "o"], capsys)
    assert_clean_failure(code, err, "does not exist")
    assert not (tmp_path / "o").exists()


def test_a_budget_that_leaves_fewer_than_two_layers(tmp_path, capsys, text_file):
    model_dir = save_tiny(tmp_path, "llama", layers=4)
    code, _, err = run(["prune", "--model", model_dir, "--remove", 3, "--calib-file", text_file, "--out", tmp_path / "o"], capsys)
    assert_clean_failure(code, err, "cannot remove 3 of 4 layers", "at least 2 must stay")
    assert not (tmp_path / "o").exists()


def test_a_calibration_file_too_short(tmp_path, capsys):
    model_dir, short = save_tiny(tmp_path, "llama"), tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    code, _, err = run(["prune", "--model", model_dir, "--remove", 1, "--calib-file", short, "--seq-len", 16,
                        "--out", tmp_path / "o"], capsys)
    assert_clean_failure(code, err, "has 3 tokens")
    assert not (tmp_path / "o").exists()


def test_a_non_empty_output_directory_is_refused_unless_overwrite(tmp_path, capsys, text_file):
    model_dir, out = save_tiny(tmp_path, "llama"), tmp_path / "o"
    args = ["prune", "--model", model_dir, "--remove", 1, "--method", "shortgpt", "--calib-file", text_file,
            "--calib-samples", 2, "--seq-len", 16, "--out", out]
    code, _, err = run(args, capsys)
    assert code == 0, err
    (out / "keep.txt").write_text("mine")
    code, _, err = run(args, capsys)
    assert_clean_failure(code, err, "not empty")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run(args + ["--overwrite"], capsys)  # lorp-fx wrote it: replaced whole
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "report.json").exists()


def test_overwrite_refuses_a_directory_lorp_fx_did_not_write(tmp_path, capsys, text_file):
    model_dir, out = save_tiny(tmp_path, "llama"), tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(["prune", "--model", model_dir, "--remove", 1, "--calib-file", text_file, "--seq-len", 16,
                        "--out", out, "--overwrite"], capsys)
    assert_clean_failure(code, err, "not written by lorp-fx", "even with overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_an_output_path_that_cannot_be_a_directory(tmp_path, capsys, text_file):
    model_dir, blocker = save_tiny(tmp_path, "llama"), tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(["prune", "--model", model_dir, "--remove", 1, "--calib-file", text_file,
                        "--out", blocker / "sub"], capsys)
    assert_clean_failure(code, err)


def test_a_tokenizer_that_does_not_match_the_model(tmp_path, capsys, text_file):
    model_dir = save_tiny(tmp_path, "llama")
    tiny_tokenizer(size=300).save_pretrained(model_dir)  # ids beyond the model's 97 embeddings
    text_file.write_text(" ".join(f"w{200 + i % 90}" for i in range(2000)))
    code, _, err = run(["prune", "--model", model_dir, "--remove", 1, "--calib-file", text_file, "--calib-samples", 4,
                        "--seq-len", 16, "--out", tmp_path / "o"], capsys)
    assert_clean_failure(code, err, "do not match")


def test_a_gguf_that_transformers_cannot_load(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 64)
    code, _, err = run(["prune", "--model", fake, "--remove", 1, "--out", tmp_path / "o"], capsys)
    assert_clean_failure(code, err)


# ----------------------------------------------------------------------------- the user's data is safe


def snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["prune", "analyze"])
@pytest.mark.parametrize("target", ["model", "model-parent", "calibration-parent", "current", "empty"])
def test_an_output_that_would_destroy_an_input_is_refused_even_with_overwrite(tmp_path, capsys, monkeypatch, command, target):
    inputs = tmp_path / "inputs"
    model_dir = save_tiny(inputs / "models", "llama")
    data = inputs / "data"
    data.mkdir()
    text = data / "calibration.txt"
    text.write_text(TEXT)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    out = {"model": model_dir, "model-parent": model_dir.parent, "calibration-parent": data, "current": ".",
           "empty": ""}[target]
    before = snapshot(tmp_path)
    args = [command, "--model", model_dir, "--calib-file", text, "--seq-len", 16, "--out", out, "--overwrite"]
    code, _, err = run(args + (["--remove", 1] if command == "prune" else []), capsys)
    assert_clean_failure(code, err, "empty" if target == "empty" else "refused even with overwrite")
    assert snapshot(tmp_path) == before


def test_an_unset_out_variable_in_a_recipe_is_refused(tmp_path, capsys, text_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text('remove: 1\nout: ""\noverwrite: true\n')
    code, _, err = run(["prune", "--config", recipe, "--model", save_tiny(tmp_path, "llama"), "--calib-file", text_file,
                        "--seq-len", 16], capsys)
    assert_clean_failure(code, err, "empty")
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("line, fragment", [
    ('overwrite: "no"', "overwrite must be true or false"), ("no_gguf: yes please", "no_gguf must be true or false"),
    ("calib_file: 3", "calib_file must be a file path or a list of them"),
    ("calib_file: [calibration.txt, null]", "calib_file must be"), ("calib_file: []", "calib_file must be"),
    ("eval_file: 7", "eval_file must be a file path"), ("selector_options: 5", "selector_options must be a mapping"),
    ("out: [a, b]", "out must be a string"), ("model: 5", "model must be a string"),
])
def test_a_recipe_value_of_the_wrong_type_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch, line, fragment):
    """Each used to run (a string taken as a true switch: `overwrite: "no"` replaced an output; a list as a
    directory name) or fail with a Python TypeError, exit 1."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "calibration.txt").write_text(TEXT)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"remove: 1\nseq_len: 16\n{line}\n")
    before = snapshot(tmp_path)
    code, _, err = run(["prune", "--config", recipe, "--out", tmp_path / "o"], capsys)
    assert_clean_failure(code, err, fragment)
    assert snapshot(tmp_path) == before


def test_abbreviated_flags_are_refused_rather_than_losing_to_the_recipe(tmp_path, capsys):
    """argparse took `--seq 16` for --seq-len, but the recipe's value won over it."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("remove: 1\nseq_len: 32\n")
    with pytest.raises(SystemExit) as stop:
        cli.main(["prune", "--config", str(recipe), "--seq", "16", "--out", str(tmp_path / "o")])
    assert stop.value.code == 2 and "unrecognized arguments: --seq" in capsys.readouterr().err


def test_a_recipe_written_by_a_run_does_not_replay_overwrite(tmp_path, capsys, text_file):
    model_dir, out = save_tiny(tmp_path, "llama"), tmp_path / "o"
    common = ["--model", model_dir, "--calib-file", text_file, "--calib-samples", 2, "--seq-len", 16, "--out", out]
    for extra in ([], ["--overwrite"]):
        code, _, err = run(["prune", "--remove", 1, "--method", "shortgpt", *common, *extra], capsys)
        assert code == 0, err
    assert "overwrite" not in (out / "recipe.yaml").read_text()
    code, _, err = run(["prune", "--config", out / "recipe.yaml"], capsys)
    assert_clean_failure(code, err, "exists and is not empty")


@pytest.mark.heatmap
def test_prune_and_analyze_outputs_replace_each_other_with_overwrite(tmp_path, capsys, text_file):
    model_dir, out = save_tiny(tmp_path, "llama"), tmp_path / "o"
    common = ["--model", model_dir, "--calib-file", text_file, "--calib-samples", 2, "--seq-len", 16, "--out", out]
    code, _, err = run(["prune", "--remove", 1, "--method", "shortgpt", *common], capsys)
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["lorp_fx"]["format"] == 1
    code, _, err = run(["analyze", *common, "--overwrite"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "similarity.png", "statistics.json"]
    assert "lorp_fx" in json.loads((out / "report.json").read_text())
    code, _, err = run(["prune", "--remove", 1, "--method", "shortgpt", *common, "--overwrite"], capsys)
    assert code == 0, err and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_prune_smollm2_end_to_end(tmp_path, capsys):
    valid = require_shared_data("wikitext-2", "valid.txt")
    out = tmp_path / "smollm2-pruned"
    code, stdout, err = run(["prune", "--remove", 3, "--calib-file", valid, "--calib-samples", 4, "--seq-len", 32,
                             "--out", out], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["layers_before"] == 30 and report["layers_after"] == 27
    assert report["method"] == "lorp" and report["compensation"]["method"] == "cosine"
    assert all(g["error_after"] < g["error_before"] for g in report["compensation"]["gaps"])
    assert report["fx_graph_max_abs_logit_difference"] < 1e-3
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 27 and len(model.model.layers) == 27
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    assert generated.shape[1] == ids.shape[1] + 8
