"""Does refitting the units after a gap close more of it? (issue 14: the 35.0 / 48.0 targets)

The default ships one map per gap, folded into the unit before it. Here, after those maps
(fitted gap after gap from the pruned model's view, `compensate(..., sequential=True)`), every
kept unit after the first gap gets a map of its own: fitted in depth order from the pruned
model's view with every earlier map folded in, towards the dense model's state after that unit
(after the gap, for the unit before one), with the same cosine objective, the ridge chosen by
4-fold cross-validation, and dropped where no ridge beats no map on held-out sequences. Every
map folds into the unit's output projection: no new parameters. Calibration: WikiText-2
valid.txt, 32 x 256; the sets are the default's (rows-wiki-32.json). A prototype: one partial
pass of the pruned model per unit. Writes research/results/refit-following-smollm2.md.

    python research/refit_following.py
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import research.common as C  # noqa: E402
from research.report import span  # noqa: E402

RESULTS = C.ROOT / "research" / "results"
EVALS = ("valid-held", "test")


def residual_states(model, batches, stack) -> list[dict]:
    """Every point of `stack` on every batch."""
    from lorp_fx.calibration.capture import Capture

    capture = Capture({stack.point(i)[0]: stack.point(i)[1:] for i in range(len(stack.units) + 1)})
    return [{k: v.clone() for k, v in capture.run(model, b).items()} for b in batches]


def perplexities(model) -> dict:
    from lorp_fx.judge.perplexity import perplexity

    return {w: perplexity(model, C.evaluation(w), batch_size=4, progress=False) for w in EVALS}


def refit_following(dense_model, indices, batches) -> tuple[dict, dict, list[dict]]:
    """Perplexities with the sequential gap maps, then with every following unit refitted; the fit log."""
    from lorp_fx.compensation.fit import compensate
    from lorp_fx.calibration.capture import Capture
    from lorp_fx.compensation.fold import fold, projections
    from lorp_fx.compensation.solver import FoldedStatistics, beats_no_map
    from lorp_fx.arch.anatomy import stacks_of
    from lorp_fx.arch.families import family_of

    names = C.layer_names(indices)
    dense_stack = stacks_of(dense_model)[0]
    dense = residual_states(dense_model, batches, dense_stack)
    done = compensate(dense_model, names, batches, "cosine", sequential=True)
    model, rename, width = done.model, done.names, dense_model.config.hidden_size
    gap_maps_only = perplexities(model)
    stack, family = stacks_of(model)[0], family_of(model)
    index = {u.full_name: k for k, u in enumerate(stack.units)}
    removed = {k for k, u in enumerate(dense_stack.units) if u.layer in names}
    log = []
    for u, unit in enumerate(dense_stack.units):
        if u < min(removed) or u in removed:  # before the first gap the states are the dense ones
            continue
        target = next((k for k in range(u + 1, len(dense_stack.units)) if k not in removed), len(dense_stack.units))
        p = index[f"{rename.get(unit.layer, unit.layer)}.{unit.name}"]
        capture = Capture({stack.point(i)[0]: stack.point(i)[1:] for i in (p, p + 1)})
        statistics, row = FoldedStatistics(width, "cosine", 4, "cpu"), 0
        for batch, states in zip(batches, dense):
            seen = capture.run(model, batch)
            statistics.update(seen[stack.point(p)[0]], seen[stack.point(p + 1)[0]],
                              states[dense_stack.point(target)[0]], None, row)
            row += batch["input_ids"].shape[0]
        total, transform, ridge, cv_errors = statistics.solve("auto")
        before = total.relative_error(None)
        folded = not cv_errors or beats_no_map(cv_errors, before)
        if folded:
            fold(projections(model, family, stack.units[p], width, "full"), transform, family.norm_weight_offset)
        log.append({"unit": unit.full_name, "error_before": before,
                    "cv_error": min(cv_errors.values()) if cv_errors else None, "ridge": ridge, "folded": folded})
    return gap_maps_only, perplexities(model), log


def main():
    C.threads(1)
    model, _ = C.model()
    batches = C.batches(C.calibration("wiki", 32))
    chosen = json.loads((RESULTS / "rows-wiki-32.json").read_text())
    rows = []
    for budget in (3, 6, 9):
        indices = chosen[f"{budget}:cosine"]["remove"]
        clock = time.perf_counter()
        gap_maps_only, refit, log = refit_following(model, indices, batches)
        row = {"removed": budget, "layers": span(indices), "gap maps": gap_maps_only, "refit": refit,
               "folded": sum(e["folded"] for e in log), "units": len(log), "seconds": time.perf_counter() - clock}
        C.emit(row, rows)
    lines = [
        "# Refitting the units after a gap (SmolLM2-135M, WikiText-2 calibration)",
        "",
        "Written by `research/refit_following.py`; do not edit the numbers by hand. Sets: the default's choice",
        "(compensated objective, rows-wiki-32.json). gap maps: one cosine map per gap, fitted gap after gap from",
        "the pruned model's view (`compensate(..., sequential=True)`). + refit: then a map for every kept unit after",
        "the first gap, each fitted towards the dense state after it, dropped where cross-validation finds no",
        "gain. Perplexity on valid-held and test windows (research/common.py); the test column decided nothing.",
        "",
        "| removed | layers | valid-held: gap maps / + refit | test: gap maps / + refit | units refitted (of) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['removed']} of 30 | {r['layers']} | {r['gap maps']['valid-held']:.2f} / {r['refit']['valid-held']:.2f} "
              f"| {r['gap maps']['test']:.2f} / {r['refit']['test']:.2f} | {r['folded']} ({r['units']}) | {r['seconds']:.0f} |"
              for r in rows]
    (RESULTS / "refit-following-smollm2.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
