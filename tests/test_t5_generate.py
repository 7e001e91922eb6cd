"""A pruned T5 generates with a KV cache whatever stack lost blocks, in memory and after reloading.

transformers sizes the decoder's cache from `config.get_text_config(decoder=True)`,
whose layer count for T5 is the encoder's `num_layers`; a T5 whose encoder ends up
shallower than its decoder used to fail in `generate` (IndexError in cache_utils).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import VOCAB, tiny_model, tiny_tokenizer

from lorp_fx.arch.surgery import remove_layers
from lorp_fx.io.checkpoint import save_pretrained_atomic

STEPS = 6

# The tiny T5 with layers=6 has 6 encoder blocks and 5 decoder blocks.
PLANS = {
    "encoder-only": (["encoder.block.1", "encoder.block.3"], (4, 5)),
    "decoder-only": (["decoder.block.1", "decoder.block.3"], (6, 3)),
    "both": (["encoder.block.1", "encoder.block.2", "encoder.block.4", "decoder.block.2"], (3, 4)),
}


def prompt(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(3))


def depths(model) -> tuple[int, int]:
    return len(model.encoder.block), len(model.decoder.block)


def generate(model, input_ids, use_cache: bool) -> torch.Tensor:
    return model.generate(input_ids=input_ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                          use_cache=use_cache)


@torch.no_grad()
def greedy_reference(model, input_ids) -> torch.Tensor:
    """Step-by-step argmax with a full forward pass (no cache) per token; EOS barred, as min_new_tokens does."""
    tokens = torch.full((input_ids.shape[0], 1), model.config.decoder_start_token_id)
    for _ in range(STEPS):
        scores = model(input_ids=input_ids, decoder_input_ids=tokens, use_cache=False).logits[:, -1].clone()
        scores[:, model.config.eos_token_id] = -float("inf")
        tokens = torch.cat([tokens, scores.argmax(-1, keepdim=True)], dim=1)
    return tokens


def check_generates(model, expected_depths) -> torch.Tensor:
    assert depths(model) == expected_depths
    input_ids = prompt()
    with_cache = generate(model, input_ids, use_cache=True)
    assert with_cache.shape == (input_ids.shape[0], STEPS + 1)
    assert torch.equal(with_cache, generate(model, input_ids, use_cache=False))
    assert torch.equal(with_cache, greedy_reference(model, input_ids))
    # The decoder's cache is as deep as the decoder; the encoder keeps its pruned depth.
    assert model.config.num_layers == expected_depths[0]
    assert model.config.get_text_config(decoder=True).num_hidden_layers == expected_depths[1]
    # A plain forward with use_cache=True: the decoder stack builds its own cache from its config copy.
    with torch.no_grad():
        out = model(input_ids=input_ids, decoder_input_ids=with_cache[:, :3], use_cache=True)
    assert len(out.cache.self_attention_cache.layers) == expected_depths[1]
    return with_cache


def reload(model, path):
    out = save_pretrained_atomic(model, tiny_tokenizer(), path)
    reloaded, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return reloaded.eval()


@pytest.mark.parametrize("plan", list(PLANS))
def test_pruned_t5_generates_with_cache_in_memory_and_after_reload(tmp_path, plan):
    removals, expected = PLANS[plan]
    pruned = remove_layers(tiny_model("t5", layers=6), removals).model

    in_memory = check_generates(pruned, expected)
    reloaded = reload(pruned, tmp_path / "pruned")
    assert torch.equal(check_generates(reloaded, expected), in_memory)


def test_pruning_a_reloaded_t5_again_keeps_the_cache_depth(tmp_path):
    """A second surgery on a checkpoint the first one wrote: every config copy follows the new decoder depth."""
    first = reload(remove_layers(tiny_model("t5", layers=6), ["encoder.block.1", "encoder.block.3"]).model, tmp_path / "a")
    second = remove_layers(first, ["decoder.block.1", "decoder.block.2"]).model
    check_generates(second, (4, 3))
    third = remove_layers(second, ["encoder.block.1", "encoder.block.2", "encoder.block.3"]).model
    check_generates(third, (1, 3))
    check_generates(reload(third, tmp_path / "b"), (1, 3))
