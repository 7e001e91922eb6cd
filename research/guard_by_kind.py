"""Would a guard that judges the model's own text per kind keep WikiText-2 maps off code? (issue 24, exploration)

With `--calib-file` WikiText-2 validation, the guard compares the mean loss of the model's 8 own check
windows (each opening with another kind of text: Python, C, HTML, a table, a letter, a list, a
question, French) with and without the maps. On SmolLM2 at 9 of 30 the maps lower that mean and are
folded, yet they raise the perplexity of Python standard-library code by 20%
(benchmarks/results/domains-smollm2.md). This measures, for the layers the CLI chooses with that
calibration, each check window's loss without maps, with every map and with every map but one, and
what the guard keeps when it judges the own windows

* `mean`: as one source (what ships);
* `class`: per class of opening (code: Python, C; markup: HTML, a table; prose: a letter, a list, a
  question; French);
* `window`: each window on its own;

and then the perplexity of each kept set on WikiText-2 test and the texts of benchmarks/domains.py.

`joint` instead fits the maps on the file's windows and the 8 own windows together (each source its own
cross-validation folds, as the default calibration fits the shipped corpus and own text), with the
judge's per-gap check, and measures the same texts and the model's own held-out text.

    python research/guard_by_kind.py [joint] [budget ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from domains import kind_texts, spread_windows

import research.common as C
from lorp_fx.arch.surgery import remove_layers
from lorp_fx.calibration.batches import token_batches
from lorp_fx.calibration.sampling import opening_ids
from lorp_fx.compensation.fit import apply_compensation
from lorp_fx.compensation.guard import keep_harmless_maps
from lorp_fx.graph.trace import trace
from lorp_fx.judge.perplexity import perplexity
from lorp_fx.pipeline.calibrate import CalibrationText, calibration_text
from lorp_fx.pipeline.config import PruneConfig
from lorp_fx.pipeline.removal import build_judge

# The layers `lorp-fx prune --calib-file valid.txt` chooses (benchmarks/results/domains-smollm2.md).
LAYERS = {9: [3, 13, 14, 15, 16, 17, 18, 25, 26], 6: [13, 14, 15, 16, 17, 18]}
CLASSES = {"Python code": "code", "C code": "code", "HTML": "markup", "a table": "markup", "a letter": "prose",
           "a list": "prose", "a question": "prose", "French": "French"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def grouped(values: list[float], labels: list[str]) -> dict[str, float]:
    return {g: sum(v for v, t in zip(values, labels) if t == g) / labels.count(g) for g in dict.fromkeys(labels)}


def joint(budgets: list[int]) -> None:
    model, tok = C.model()
    texts = kind_texts()
    evals = {"wikitext-2 test": C.evaluation("test")[:30],
             "own held-out": torch.load(C.ROOT / "benchmarks" / "cache" / "domains-own-64x256.pt")[32:62]}
    evals.update({k: spread_windows(tok, t, 8, 512) for k, t in texts.items()})
    out = C.ROOT / "research" / "results" / "joint-fit-smollm2.json"
    rows = json.loads(out.read_text()) if out.exists() else {}
    for budget in budgets:
        config = PruneConfig(remove=budget)
        guarded = calibration_text(model, C.DATA / "valid.txt", config, tok, False, guard=True)
        text = CalibrationText(guarded.windows, guarded.source, guarded.sources, frozenset())  # own text fitted on too
        batches = token_batches(text.windows, config.batch_size)
        judge = build_judge(model, trace(model, dict(batches[0], use_cache=False)), batches, config, False, text)
        names = C.layer_names(LAYERS[budget])
        report = judge.compensation_report(names)
        final = judge.final_fits(names) if report["apply"] else []
        pruned = remove_layers(model, names)
        apply_compensation(pruned, names, final)
        ppl = {k: perplexity(pruned.model, w, batch_size=4, progress=False) for k, w in evals.items()}
        rows[str(budget)] = {"layers": LAYERS[budget], "gaps": [f.fold_into for f in final], "ppl": ppl,
                             "sources": report["sources"], "dropped": report["dropped"]}
        log(f"{budget}: joint {rows[str(budget)]}")
        out.write_text(json.dumps(rows, indent=1))


def main() -> None:
    C.threads(1)
    if sys.argv[1:2] == ["joint"]:
        return joint([int(b) for b in sys.argv[2:]] or [9, 6])
    budgets = [int(b) for b in sys.argv[1:]] or [9, 6]
    model, tok = C.model()
    kinds = list(opening_ids(tok))
    texts = kind_texts()
    evals = {"wikitext-2 test": C.evaluation("test")[:30]}
    evals.update({k: spread_windows(tok, t, 8, 512) for k, t in texts.items()})
    out = C.ROOT / "research" / "results" / "guard-by-kind-smollm2.json"
    rows = json.loads(out.read_text()) if out.exists() else {}
    for budget in budgets:
        rows[str(budget)] = per_kind(model, tok, kinds, evals, budget)
        out.write_text(json.dumps(rows, indent=1))


def per_kind(model, tok, kinds: list[str], evals: dict, budget: int) -> dict:
    """The check windows' losses, what each rule keeps and the perplexities at one budget."""
    config = PruneConfig(remove=budget)
    text = calibration_text(model, C.DATA / "valid.txt", config, tok, False, guard=True)
    batches = token_batches(text.windows, config.batch_size)
    judge = build_judge(model, trace(model, dict(batches[0], use_cache=False)), batches, config, False, text)
    names = C.layer_names(LAYERS[budget])
    units = judge.runner.units_of(names)
    fits = {f.fold_into: f for f in judge.fits(names)}
    index = {unit.name: u for u, unit in enumerate(judge.runner.units)}
    # Window labels in the judge's order: its loss windows, then its guard windows (the own text, in order).
    own_kinds = [kinds[i % len(kinds)] for i in range(len(judge.guard_indices))]
    labels = {"mean": ["file"] * len(judge.loss_indices) + ["own"] * len(own_kinds),
              "class": ["file"] * len(judge.loss_indices) + [CLASSES[k] for k in own_kinds],
              "window": ["file"] * len(judge.loss_indices) + own_kinds}

    def losses(gaps: list[str]) -> list[float]:
        return judge._losses_with(units, {index[g]: fits[g].transform.float() for g in gaps})

    measured = {(): losses([])}
    every = tuple(sorted(fits))
    measured[every] = losses(list(every))
    for gap in every:
        measured[tuple(g for g in every if g != gap)] = losses([g for g in every if g != gap])
    log(f"{budget}: plain {grouped(measured[()], labels['window'])}")
    log(f"{budget}: every map {grouped(measured[every], labels['window'])}")
    row = {"layers": LAYERS[budget], "gaps": list(every), "windows": {}, "kept": {}, "ppl": {}}
    for key, values in measured.items():
        row["windows"]["|".join(key) or "none"] = grouped(values, labels["window"])

    def measure_with(label: list[str]):
        def measure(gaps: list[str]) -> dict[str, float]:
            key = tuple(sorted(gaps))
            if key not in measured:
                measured[key] = losses(list(key))
            return grouped(measured[key], label)
        return measure

    for rule, label in labels.items():
        kept, _, dropped = keep_harmless_maps(list(every), measure_with(label), grouped(measured[()], label))
        row["kept"][rule] = {"kept": kept, "dropped": dropped}
        log(f"{budget}: {rule} keeps {kept}")
    final = {f.fold_into: f for f in judge.final_fits(names)}
    sets = {"none": [], **{rule: v["kept"] for rule, v in row["kept"].items()}, "every": list(every)}
    done: dict = {}
    for label, kept in sets.items():
        key = tuple(sorted(kept))
        if key not in done:
            pruned = remove_layers(model, names)
            apply_compensation(pruned, names, [final[g] for g in kept])
            done[key] = {k: perplexity(pruned.model, w, batch_size=4, progress=False) for k, w in evals.items()}
            del pruned
        row["ppl"][label] = done[key]
        log(f"{budget}: {label} {done[key]}")
    return row


if __name__ == "__main__":
    main()
