"""Self-calibration in one batched pass draws what the one-window-at-a-time sampler drew."""

import numpy as np
import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from lorp_fx.calibration.sampling import _full_nucleus, _nucleus, self_calibration


@torch.no_grad()
def reference_windows(model, tokenizer, n, seq_len, seed=0, temperature=1.0, top_p=0.95):
    """The sampler as it was: one window at a time, a growing cache, the nucleus from a full sort."""
    seeds = np.random.SeedSequence(seed).spawn(n)
    rows = []
    for s in seeds:
        generator = torch.Generator().manual_seed(int(s.generate_state(1, np.uint64)[0]))
        tokens, cache = torch.tensor([[tokenizer.bos_token_id]]), None
        step = tokens
        for _ in range(seq_len - 1):
            out = model(input_ids=step, cache=cache, use_cache=True)
            cache = out.cache
            probs = _full_nucleus(torch.softmax(out.logits[:, -1].float() / temperature, dim=-1), top_p)
            step = torch.multinomial(probs[0], 1, generator=generator)[None]
            tokens = torch.cat([tokens, step], dim=1)
        rows.append(tokens)
    return torch.cat(rows)


def test_batched_static_cache_sampling_draws_the_reference_windows():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    expected = reference_windows(model, tokenizer, 5, 14)
    assert torch.equal(self_calibration(model, tokenizer, 5, 14, progress=False), expected)
    assert torch.equal(self_calibration(model, tokenizer, 5, 14, batch_size=2, progress=False), expected)


def test_a_share_of_the_windows_is_those_windows():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    everything = self_calibration(model, tokenizer, 6, 10, progress=False)
    share = self_calibration(model, tokenizer, 6, 10, windows=[4, 1, 5], progress=False)
    assert torch.equal(share, everything[[4, 1, 5]])
    with pytest.raises(Exception, match="window indices"):
        self_calibration(model, tokenizer, 6, 10, windows=[6], progress=False)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95, 0.999])
def test_the_partial_sort_nucleus_is_the_full_sort_nucleus(top_p):
    generator = torch.Generator().manual_seed(0)
    peaked = torch.randn(6, 5000, generator=generator) * 4  # nucleus within the first candidates
    flat = torch.randn(6, 5000, generator=generator) * 0.1  # nucleus of thousands: the full sort
    for logits in (peaked, flat, torch.cat([peaked, flat])):
        probs = torch.softmax(logits, dim=-1)
        assert torch.equal(_nucleus(probs.clone(), top_p), _full_nucleus(probs.clone(), top_p))


@pytest.mark.parametrize("top_p", [0.5, 0.95])
def test_every_tier_of_partial_sorts_gives_the_full_sort_nucleus(top_p):
    """Rows whose nucleus lies in the first tier, in the second, and in neither (the full sort), mixed."""
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randn(3, 20000, generator=generator) * scale for scale in (5.0, 1.5, 0.05)]
    probs = torch.softmax(torch.cat(rows), dim=-1)
    widths = (_full_nucleus(probs.clone(), top_p) > 0).sum(-1).view(3, 3)
    tiers = (int(widths[0].max()) + 1, int(widths[1].max()) + 1)  # each group of rows in its own tier
    assert widths[1].min() > tiers[0] and widths[2].min() > tiers[1]
    assert torch.equal(_nucleus(probs.clone(), top_p, tiers), _full_nucleus(probs.clone(), top_p))


def test_windows_are_sampled_together_where_the_judge_will_hold_more_than_their_kv_cache():
    """The KV cache may grow to what the selection's judge caches anyway, not beyond: all
    windows in one round where the compensated judge keeps more states than their cache,
    rounds where nothing but the 0.3x-weights allowance is free (ShortGPT, no compensation)."""
    from lorp_fx.pipeline.calibrate import kv_bytes_per_token, sampling_batch_size
    from lorp_fx.pipeline.config import PruneConfig
    from lorp_fx.pipeline.removal import judge_state_bytes

    model = tiny_model("llama", layers=4)
    judged = PruneConfig(remove=1, seq_len=64, calib_samples=64, batch_size=1)
    free = PruneConfig(remove=1, seq_len=64, calib_samples=64, batch_size=1, method="shortgpt", compensate="none")
    cache = kv_bytes_per_token(model) * 64 * 64
    assert judge_state_bytes(model, free) == 0 and judge_state_bytes(model, judged) >= cache
    assert sampling_batch_size(model, judged) == 64
    assert sampling_batch_size(model, free) < 64


def test_opened_windows_begin_with_their_opening_and_draw_the_rest_as_the_plain_sampler_would():
    """Window i continues its start token with opening i mod n; at the opening's positions the draws are made and
    discarded, so the windows do not depend on the batch they were sampled in or on which share is asked."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    openings = [tokenizer("w5 w6 w7", add_special_tokens=False)["input_ids"], tokenizer("w9", add_special_tokens=False)["input_ids"]]
    opened = self_calibration(model, tokenizer, 5, 12, openings=openings, progress=False)
    for i, window in enumerate(opened):
        opening = openings[i % 2]
        assert window[0] == tokenizer.bos_token_id and window[1 : 1 + len(opening)].tolist() == opening
    assert torch.equal(self_calibration(model, tokenizer, 5, 12, openings=openings, batch_size=2, progress=False), opened)
    assert torch.equal(self_calibration(model, tokenizer, 5, 12, openings=openings, windows=[3, 0], progress=False),
                       opened[[3, 0]])
    plain = self_calibration(model, tokenizer, 5, 12, progress=False)
    assert not torch.equal(opened, plain)
    long = [list(range(5, 40))]  # longer than the window: the window is the opening, cut
    assert self_calibration(model, tokenizer, 1, 12, openings=long, progress=False)[0, 1:].tolist() == long[0][:11]


def test_openings_the_tokenizer_cannot_spell_are_left_out():
    from lorp_fx.calibration.sampling import OPENINGS, opening_ids

    tokenizer = tiny_tokenizer()  # a word-level vocabulary w0, w1, ...: none of the shipped openings
    assert opening_ids(tokenizer) == {}
    spelled = opening_ids(tokenizer, {"words": "w3 w4", "code": "```python\n", "mixed": "w3 {"})
    assert spelled == {"words": tokenizer("w3 w4", add_special_tokens=False)["input_ids"]}
    assert len(OPENINGS) == 8 and all(OPENINGS.values())
