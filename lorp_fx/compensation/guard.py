"""The guard of `--compensate auto` across calibration sources: which gaps' maps may be folded.

A run calibrates on text of one or more sources (the user's file or the shipped corpus, and
the model's own text). Maps fitted on one kind of text can hurt another (issue 24), so a
set of maps is accepted only if, on the held-out windows of *every* source, the loss with
the maps is not above the loss without them. Where it is, maps are dropped one gap at a
time, each time the one whose removal leaves the smallest worst excess over the plain loss
(measured, not estimated), until every source is satisfied or no map is left.

Pure: `measure(gaps)` gives the per-source loss with the maps of `gaps` folded; the judge
(`judge.candidates`) and the pipeline without a judge (`pipeline.removal`) supply it.
"""

from __future__ import annotations

from collections.abc import Callable


def worst_excess(losses: dict[str, float], plain: dict[str, float]) -> float:
    """The largest amount by which a source's loss with maps exceeds its loss without (<= 0: none hurt)."""
    return max(losses[s] - plain[s] for s in plain)


def keep_harmless_maps(gaps: list[str], measure: Callable[[list[str]], dict[str, float]],
                       plain: dict[str, float]) -> tuple[list[str], dict[str, float], list[dict]]:
    """(the gaps whose maps are kept, the per-source losses with them, the maps dropped and why).

    `gaps` names every gap that has a map; `plain` is the per-source loss without any map.
    The result's losses are <= `plain` on every source (with no map left they equal it)."""
    kept = list(gaps)
    losses = measure(kept) if kept else dict(plain)
    dropped: list[dict] = []
    while kept and worst_excess(losses, plain) > 0:
        trials = {gap: measure([g for g in kept if g != gap]) if len(kept) > 1 else dict(plain) for gap in kept}
        gap = min(kept, key=lambda g: worst_excess(trials[g], plain))
        hurt = sorted(s for s in plain if losses[s] > plain[s])
        dropped.append({"gap": gap, "sources_hurt": hurt})
        kept.remove(gap)
        losses = trials[gap]
    return kept, losses, dropped
