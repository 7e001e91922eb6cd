"""The judge's compensation check across calibration sources: the evidence `report.json` gives per source.

`CandidateLoss.compensation_report(removed)` answers whether the maps of `removed`'s gaps may be
folded: their loss on the held-out windows of each calibration source (the loss windows, and
every window of a source the maps are never fitted on, such as the model's own text beside a
user's file) against the loss there without maps. `compensation.guard.keep_harmless_maps`
drops maps, gap by gap, until no source is hurt.
"""

from __future__ import annotations

from collections.abc import Iterable

from lorp_fx.compensation.guard import keep_harmless_maps, worst_excess


def compensation_report(judge, removed: Iterable[str]) -> dict:
    """`CandidateLoss.compensation_report`: the losses with and without the held-out maps (fitted on the
    other windows when fit_on='others'), overall and per source; `kept` names the fold units whose maps
    survive the guard, `dropped` the others and the sources they hurt; `apply` is whether any map remains
    (or none was to be folded), `helps` whether the whole set hurt no source."""
    removed = list(removed)
    compensated, plain = judge.loss(removed), judge.loss(removed, compensate=False)
    report = {"method": judge.compensation, "compensated_loss": compensated, "uncompensated_loss": plain,
              "held_out": judge.fit_on == "others", "apply": False, "helps": compensated <= plain,
              "gaps_without_map": [], "kept": [], "dropped": [], "sources": {}}
    if not judge.compensation:
        return report
    units = judge.runner.units_of(removed)
    report["gaps_without_map"] = [[judge.runner.units[u].name for u in range(a, b + 1)]
                                  for a, b in judge.gaps(units) if judge._fit(a, b) is None]
    fits = {f.fold_into: f for f in judge.fits(removed)}
    index = {unit.name: u for u, unit in enumerate(judge.runner.units)}

    def maps_of(gaps: list[str]) -> dict:
        return {index[g]: fits[g].transform.float() for g in gaps}

    def measure(gaps: list[str]) -> dict[str, float]:
        if sorted(gaps) == sorted(fits):  # every map: the loss windows' part is memoised
            return by_source(judge, judge.window_losses[(units, True)] + judge._guard_losses(units, maps_of(gaps)))
        return by_source(judge, judge._losses_with(units, maps_of(gaps)))

    plain_windows = judge.window_losses[(units, False)] + judge._guard_losses(units, {})
    plain_by_source = by_source(judge, plain_windows)
    every = measure(list(fits)) if fits else dict(plain_by_source)
    kept, losses, dropped = keep_harmless_maps(list(fits), measure, plain_by_source)
    counts = judge.source_counts()
    report["sources"] = {s: {"windows": int(counts[s]), "uncompensated": plain_by_source[s], "compensated": every[s],
                             "folded": losses[s]} for s in plain_by_source}
    report.update(apply=bool(kept) or not fits, helps=worst_excess(every, plain_by_source) <= 0, kept=kept,
                  dropped=dropped)
    return report


def by_source(judge, window_values: list[float]) -> dict[str, float]:
    """Per source, the mean of values given per loss window, then per guard window, of this process, over every
    process (`CandidateLoss.source_means`)."""
    return judge.source_means(window_values)
