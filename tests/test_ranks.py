"""One decision however the work is split (issue 26): the judge on the calibration windows split over 1, 2 or 3
ranks (threads whose reduce sums like an all-reduce: tests/simulated_ranks.py) gives one process's statistics,
losses, maps and plan. The real multi-process paths (--devices N, the callback under DDP) are in
test_distributed_cli.py and test_callback.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from simulated_ranks import SimulatedRanks
from tiny_models import VOCAB, tiny_model, trace_inputs

from lorp_fx.graph.trace import trace
from lorp_fx.judge.candidates import CandidateLoss
from lorp_fx.selection.registry import select

WINDOWS = 12
SOURCES = {
    "one source": (None, (), True),
    "two sources": (["corpus", "own"] * (WINDOWS // 2), (), True),
    # maps that hurt the guard source are still fitted (not rejected), so that they are compared too
    "a guard source": (["corpus", "corpus", "own"] * (WINDOWS // 3), ("own",), False),
}
SPREAD_REMOVAL = ["model.layers.1", "model.layers.2", "model.layers.4"]  # gaps that are fitted on every split
_SETUP: dict = {}


def setup():
    if not _SETUP:
        torch.manual_seed(0)
        model = tiny_model("llama", layers=6)
        ids = torch.randint(2, VOCAB, (WINDOWS, 16), generator=torch.Generator().manual_seed(1))
        _SETUP["graph"] = trace(model, dict(trace_inputs("llama"), use_cache=False))
        _SETUP["windows"] = [{"input_ids": ids[i : i + 1], "attention_mask": torch.ones(1, 16, dtype=torch.long)}
                             for i in range(WINDOWS)]
    return _SETUP["graph"], _SETUP["windows"]


def decide(judge: CandidateLoss) -> dict:
    """What a run decides from its judge: statistics, the plan, the losses it measured, the maps it folds."""
    stats = judge.statistics()
    plan = select(stats, 2, method="lorp", loss_fn=judge)
    report = judge.compensation_report(plan.remove)
    # every checked map, not only those the guard kept: on a random model the guard may keep none
    fits = judge.final_fits(plan.remove) + judge.final_fits(SPREAD_REMOVAL)
    return {"similarity": stats.similarity, "tokens": stats.token_count, "remove": plan.remove,
            "losses": {tuple(sorted(k[0])): v for k, v in judge.memo.items() if not k[1]},
            "compensated": report["compensated_loss"], "sources": report["sources"],
            "kept": report["kept"], "maps": {(i, f.fold_into): f.transform for i, f in enumerate(fits)},
            "ridges": {(i, f.fold_into): f.ridge for i, f in enumerate(fits)}}


def one_process(sources, held_only, reject) -> dict:
    graph, windows = setup()
    return decide(CandidateLoss(graph, windows, loss_windows=4, compensation="cosine", sources=sources,
                                held_only=held_only, reject_unhelpful_maps=reject))


_REFERENCE: dict = {}


@pytest.mark.parametrize("case", list(SOURCES))
@settings(max_examples=4, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])  # no shrinking: each example is a few judges
@given(split=st.lists(st.integers(0, 2), min_size=WINDOWS, max_size=WINDOWS).filter(lambda s: 0 in s))
def test_any_split_of_the_windows_over_ranks_gives_one_process_decision(case, split):
    sources, held_only, reject = SOURCES[case]
    if case not in _REFERENCE:
        _REFERENCE[case] = one_process(sources, held_only, reject)
    reference = _REFERENCE[case]
    world = max(split) + 1
    ranks = [[i for i, r in enumerate(split) if r == rank] for rank in range(world)]
    if any(not mine for mine in ranks):
        return  # a rank with no window: --devices and the callback never start one
    graph, windows = setup()
    labels = sources or ["calibration"] * WINDOWS

    def work(rank, reduce):
        mine = ranks[rank]
        judge = CandidateLoss(graph, [windows[i] for i in mine], loss_windows=4, compensation="cosine",
                              sources=labels, held_only=held_only, reject_unhelpful_maps=reject,
                              window_indices=mine, reduce=reduce)
        return decide(judge)

    for got in SimulatedRanks(world).run(work):
        assert got["remove"] == reference["remove"]
        assert got["tokens"] == reference["tokens"]
        # float64 sums of the same float32 terms in another order
        np.testing.assert_allclose(got["similarity"], reference["similarity"], atol=1e-12)
        assert got["losses"].keys() == reference["losses"].keys()
        for key, value in reference["losses"].items():
            assert got["losses"][key] == pytest.approx(value, rel=1e-12)
        assert got["compensated"] == pytest.approx(reference["compensated"], rel=1e-9)
        assert reference["maps"], "no map was fitted: the maps are not compared"
        assert got["kept"] == reference["kept"] and got["sources"].keys() == reference["sources"].keys()
        for source, figures in reference["sources"].items():
            assert got["sources"][source] == pytest.approx(figures, rel=1e-9)
        assert got["ridges"] == reference["ridges"] and got["maps"].keys() == reference["maps"].keys()
        for name, transform in reference["maps"].items():
            torch.testing.assert_close(got["maps"][name], transform, rtol=0, atol=1e-9)
