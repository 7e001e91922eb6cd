"""`lorp-fx prune` on a GGUF model writes a pruned GGUF beside the checkpoint; `lorp-fx eval` reads it."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gguf")
from gguf import GGUFReader  # noqa: E402
from gguf_files import write_tiny_gguf  # noqa: E402

from lorp_fx import cli  # noqa: E402
from lorp_fx.arch.surgery import remove_layers  # noqa: E402
from lorp_fx.io.models import load_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("llama") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(" ".join(f"the river {i % 17} town {i % 5} ship" for i in range(600)))
    return path


def run(args, capsys):
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def prune(tiny_llama, text, out, capsys, *extra):
    return run(["prune", "--model", tiny_llama, "--remove", 2, "--method", "shortgpt", "--calib-file", text,
                "--calib-samples", 4, "--seq-len", 16, "--out", out, *extra], capsys)


def logits(model):
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_gguf_model_is_also_saved_as_a_pruned_gguf_of_the_same_name(tmp_path, tiny_llama, text, capsys):
    out = tmp_path / "out"
    code, _, err = prune(tiny_llama, text, out, capsys, "--compensate", "none")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    gguf = report["gguf"]
    pruned = out / tiny_llama.name
    assert gguf["file"] == tiny_llama.name and gguf["size_bytes"] == pruned.stat().st_size
    assert gguf["layers_after"] == report["layers_after"] and gguf["tensor_types"]
    assert int(GGUFReader(pruned).fields["llama.block_count"].contents()) == report["layers_after"]
    # No tensor requantized: the pruned file equals surgery on the input file, both dequantized alike.
    removed = report["removed"]
    reference = remove_layers(load_model(tiny_llama)[0], removed).model
    assert torch.equal(logits(load_model(pruned)[0]), logits(reference))
    assert gguf["requantized"] == []


@pytest.mark.parametrize("requantize", ["original", "q8_0"])
def test_compensated_projections_are_requantized(tmp_path, tiny_llama, text, capsys, requantize):
    out = tmp_path / requantize
    code, _, err = prune(tiny_llama, text, out, capsys, "--compensate", "cosine", "--gguf-requantize", requantize)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    folded = {p for gap in report["compensation"]["gaps"] for p in gap["projections"]}
    assert folded and len(report["gguf"]["requantized"]) == len(folded)
    if requantize == "q8_0":
        assert {r["type"] for r in report["gguf"]["requantized"]} == {"Q8_0"}
    float_model = load_model(out)[0]
    gguf_model = load_model(out / tiny_llama.name)[0]
    difference = (logits(gguf_model) - logits(float_model)).abs().max()
    assert 0 < difference < 0.5 * logits(float_model).abs().max()  # requantization error, not a wrong model


def test_no_gguf_and_eval_of_the_pruned_file(tmp_path, tiny_llama, text, capsys):
    out = tmp_path / "plain"
    assert prune(tiny_llama, text, out, capsys, "--no-gguf")[0] == 0
    assert not (out / tiny_llama.name).exists() and "gguf" not in json.loads((out / "report.json").read_text())
    pruned = tmp_path / "with"
    assert prune(tiny_llama, text, pruned, capsys)[0] == 0
    code, stdout, err = run(["eval", "--model", pruned / tiny_llama.name, "--eval-file", text, "--eval-samples", 2,
                             "--eval-seq-len", 16], capsys)
    assert code == 0, err
    assert "perplexity" in stdout


def test_a_corrupt_gguf_is_refused_before_any_work(tmp_path, text, capsys):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 40)
    code, _, err = run(["prune", "--model", broken, "--remove", 1, "--calib-file", text, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "broken.gguf" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_gguf_model_offloaded_to_disk_saves_its_own_weights(tiny_llama, text, tmp_path, capsys):
    """A GGUF model is dequantized in memory, then spread by accelerate: with every weight on disk its weights
    must be written to the offload folder first (accelerate wrote none and failed), and a folder holding another
    model's offloaded weights must not be read (accelerate reuses any index.json it finds: it saved them)."""
    from accelerate.utils import offload_state_dict
    from safetensors.torch import load_file

    stale = tmp_path / "offload"
    other = load_model(str(write_tiny_gguf(tmp_path / "other.gguf", seed=1)))[0]
    offload_state_dict(str(stale), other.state_dict())  # what an earlier offloaded run of another model leaves
    index = (stale / "index.json").read_text()
    code, _, err = prune(tiny_llama, text, tmp_path / "disk", capsys, "--no-gguf", "--device-map", "auto",
                         "--max-memory", "cpu=1KB", "--offload-dir", stale)
    assert code == 0, err
    code, _, err = prune(tiny_llama, text, tmp_path / "memory", capsys, "--no-gguf")
    assert code == 0, err
    offloaded, in_memory = load_file(tmp_path / "disk" / "model.safetensors"), load_file(tmp_path / "memory" / "model.safetensors")
    assert set(in_memory) <= set(offloaded)
    assert max(float((offloaded[k] - in_memory[k]).abs().max()) for k in in_memory) < 1e-5
    for extra in set(offloaded) - set(in_memory):  # the tied head, written out by the offloaded save
        assert extra == "lm_head.weight" and torch.equal(offloaded[extra], offloaded["model.embed_tokens.weight"])
    code, _, err = run(["eval", "--model", tmp_path / "disk", "--eval-file", text, "--eval-samples", 2, "--eval-seq-len", 16],
                       capsys)
    assert code == 0, err
    assert (stale / "index.json").read_text() == index  # left as it was: the run wrote into a fresh folder of its own


def test_a_gguf_path_is_read_from_where_it_points_whatever_the_current_directory_holds(tmp_path, monkeypatch):
    """transformers reads a bare GGUF file name from the current directory first: `sub/tiny.gguf` loaded the
    `tiny.gguf` beside the user (another model), or failed on its missing tensors."""
    write_tiny_gguf(tmp_path / "tiny.gguf", n_layers=6, seed=0)
    (tmp_path / "sub").mkdir()
    write_tiny_gguf(tmp_path / "sub" / "tiny.gguf", n_layers=8, seed=1)
    monkeypatch.chdir(tmp_path)
    model, _ = load_model("sub/tiny.gguf")
    assert model.config.num_hidden_layers == 8


def test_the_report_names_the_written_gguf_where_it_lies(tiny_llama, text, tmp_path, capsys):
    """It named the file in the temporary directory that the output was assembled in, gone after the rename."""
    code, _, err = prune(tiny_llama, text, tmp_path / "out", capsys)
    assert code == 0, err
    written = json.loads((tmp_path / "out" / "report.json").read_text())["gguf"]
    assert written["path"] == str((tmp_path / "out" / written["file"]).resolve()) and (tmp_path / "out" / written["file"]).is_file()
