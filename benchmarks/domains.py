"""Quality across kinds of text (issue 24): does a pruned, compensated model hold on text it was not calibrated on?

    python benchmarks/domains.py                  # SmolLM2-135M, 6 and 9 of 30 layers
    python benchmarks/domains.py --budgets 9 --sources default,wiki

For each calibration source and budget the layers are chosen once, by `prune_model` with the
CLI's defaults (what `lorp-fx prune` does), and reused for each compensation choice:

* sources: `own` (32 x 256 windows the model writes itself, seed 0: today's default before issue
  24), `wiki` (the first 32 x 256 tokens of WikiText-2 valid.txt, as `--calib-file`; the run adds
  8 windows of the model's own text for the guard), `default` (no `--calib-file`: the shipped
  corpus and the model's own text, `PruneConfig.own_windows` of them);
* compensation: `none` (the same layers, no map), `single` (the compensation before issue 24:
  cosine maps fitted on the calibration windows as one source, 4-fold cross-validated ridge, a gap
  left open where its map does not beat none on held-out windows, the set checked on the loss
  windows) and `new` (what the run ships: maps checked on the held-out windows of every source).

Evaluation, perplexity on text no calibration above uses (never for a decision):
* `wikitext-2 test`: the first 40 x 512 tokens of test.txt (the quality benchmark's protocol);
* `own held-out`: windows 32..63 of a 64 x 256 self-calibration sample (seed 0), drawn from
  generators that calibration windows 0..31 do not use;
* `code` (Python standard library sources), `docs` (Python's pydoc topics: technical prose) and
  `legal` (the licences in /usr/share/common-licenses, where present): 8 x 512 tokens each,
  windows spread evenly over the whole text.

Selections and every perplexity are cached in `benchmarks/results/domains-<tag>.json` (a rerun only
computes what is missing; `--fresh` starts over). Writes `benchmarks/results/domains-<tag>.md`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from lorp_fx.arch.surgery import remove_layers  # noqa: E402
from lorp_fx.calibration.batches import token_batches  # noqa: E402
from lorp_fx.calibration.sampling import self_calibration  # noqa: E402
from lorp_fx.compensation.fit import apply_compensation  # noqa: E402
from lorp_fx.core.names import compress, layer_index  # noqa: E402
from lorp_fx.graph.trace import trace  # noqa: E402
from lorp_fx.io.models import load_model  # noqa: E402
from lorp_fx.io.text import shared_data_dir, text_windows  # noqa: E402
from lorp_fx.judge.candidates import CandidateLoss  # noqa: E402
from lorp_fx.judge.perplexity import perplexity  # noqa: E402
from lorp_fx.pipeline.calibrate import calibration_text  # noqa: E402
from lorp_fx.pipeline.config import PruneConfig  # noqa: E402
from lorp_fx.pipeline.run import prune_model  # noqa: E402

SOURCES = ("own", "wiki", "default")
CHOICES = ("none", "single", "new")
KINDS = ("wikitext-2 test", "own held-out", "code", "docs", "legal")
CALIB, LENGTH = 32, 256
EXTRA = 8  # windows of 512 tokens per extra kind of text


def log(message: str) -> None:
    print(f"[domains {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- text


def spread_windows(tokenizer, text: str, n: int, length: int) -> torch.Tensor:
    """`n` windows of `length` tokens spread evenly over the whole text."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    step = (len(ids) - length) // max(1, n - 1)
    return torch.tensor([ids[i * step : i * step + length] for i in range(n)], dtype=torch.long)


def kind_texts() -> dict[str, str]:
    """The extra kinds of text on a fresh machine (Debian's licences only where present)."""
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = {"code": "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))),
             "docs": "\n\n".join(topics[k] for k in sorted(topics))}
    licences = Path("/usr/share/common-licenses")
    if licences.is_dir():
        texts["legal"] = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(licences.iterdir())
                                     if p.is_file() and not p.is_symlink())
    return texts


def own_sample(model, tokenizer, cache: Path) -> torch.Tensor:
    """64 x 256 windows the model writes itself (seed 0): 0..31 calibrate `own`, 32..63 are held out."""
    path = cache / "domains-own-64x256.pt"
    if path.exists():
        return torch.load(path)
    windows = self_calibration(model, tokenizer, 2 * CALIB, LENGTH, seed=0, progress=False)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(windows, path)
    return windows


# --------------------------------------------------------------------------- runs


def calibration_of(source: str, own: torch.Tensor, wiki_valid: Path):
    """(what prune_model is given, the PruneConfig fields that make it that source)."""
    if source == "own":
        return own[:CALIB], {"own_windows": 0}
    if source == "wiki":
        return wiki_valid, {}
    return None, {}


def select(model, tokenizer, source: str, budget: int, own: torch.Tensor, wiki_valid: Path):
    """`prune_model` with the CLI's defaults: the layers, the shipped (compensated) model and its report."""
    calibration, fields = calibration_of(source, own, wiki_valid)
    config = PruneConfig(remove=budget, **fields)
    result = prune_model(model, calibration, config, tokenizer=tokenizer, progress=False)
    return result, config


def single_source_fits(model, tokenizer, config: PruneConfig, calibration, names: list[str]):
    """The compensation before issue 24 for these layers: the calibration windows as one source."""
    text = calibration_text(model, calibration, config, tokenizer, progress=False, guard=False)
    batches = token_batches(text.windows, config.batch_size)
    example = dict(batches[0], use_cache=False)
    judge = CandidateLoss(trace(model, example), batches, loss_windows=config.loss_windows, compensation="cosine")
    check = judge.compensation_report(names)
    fits = judge.final_fits(names) if check["apply"] else []
    return fits, {"applied": check["apply"], "compensated": check["compensated_loss"],
                  "uncompensated": check["uncompensated_loss"], "gaps": [f.fold_into for f in fits]}


def evaluate(model_or_pruned, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    return {kind: perplexity(model_or_pruned, w, batch_size=4, progress=False) for kind, w in windows.items()}


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="9,6", help="in the order they are run (9, the issue's main target, first)")
    p.add_argument("--sources", default=",".join(SOURCES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="smollm2")
    p.add_argument("--fresh", action="store_true", help="ignore the cached selections and perplexities")
    p.add_argument("--choices", default=",".join(CHOICES), help="the compensation choices to measure")
    p.add_argument("--from-log", type=Path, nargs="+", help="only merge the selections and perplexities printed in "
                   "these logs of earlier runs into the store (a run whose write another process overwrote), and render")
    p.add_argument("--layers", help="with one source and budget: the layers its selection chose (from another "
                                    "process's log), to measure other choices in parallel")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = shared_data_dir()
    if data is None:
        raise SystemExit("WikiText-2 (../shared/data/wikitext-2) is needed for the wikitext-2 rows and the wiki source")
    wikitext = data / "wikitext-2"
    store_path = common.RESULTS / f"domains-{args.tag}.json"
    store = {} if args.fresh or not store_path.exists() else json.loads(store_path.read_text())
    store.setdefault("runs", {})
    store.setdefault("machine", common.machine())  # the first run's; every command that added to the store is listed
    store["commands"] = [*store.get("commands", []), common.machine()["command"]]

    def save() -> None:
        # Re-read first: several processes may fill in different sources or budgets of one store.
        if store_path.exists():
            on_disk = json.loads(store_path.read_text())
            for key, run in on_disk.get("runs", {}).items():
                mine = store["runs"].setdefault(key, run)
                for field, value in run.items():  # what another process measured for this run
                    if field == "ppl":
                        mine["ppl"] = {**value, **mine.get("ppl", {})}
                    else:
                        mine.setdefault(field, value)
            store.setdefault("dense", on_disk.get("dense"))
            store["commands"] = list(dict.fromkeys([*on_disk.get("commands", []), *store["commands"]]))
        store["complete"] = all(f"{s}:{b}" in store["runs"] and len(store["runs"][f"{s}:{b}"].get("ppl", {})) == len(CHOICES)
                                for s in SOURCES for b in (6, 9))
        common.write_text(store_path, json.dumps(store, indent=1))
        common.write_text(common.RESULTS / f"domains-{args.tag}.md", render(store))

    if args.from_log:
        for path in args.from_log:
            merge_log(store, path.read_text())
        save()
        return
    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    own = own_sample(model, tokenizer, common.ROOT / "benchmarks" / "cache")
    windows = {"wikitext-2 test": text_windows(tokenizer, [wikitext / "test.txt"], 40, 512), "own held-out": own[CALIB:]}
    windows.update({kind: spread_windows(tokenizer, text, EXTRA, 512) for kind, text in kind_texts().items()})
    if "dense" not in store:
        store["dense"] = evaluate(model, windows)
        save()
    log(f"dense: {store['dense']}")
    for budget in [int(b) for b in args.budgets.split(",")]:
        for source in args.sources.split(","):
            key = f"{source}:{budget}"
            run = store["runs"].setdefault(key, {"source": source, "budget": budget, "ppl": {}})
            if args.layers:
                run.setdefault("layers", [int(i) for i in args.layers.split(",")])
            choices = args.choices.split(",")
            if "new" in choices and ("layers" not in run or "new" not in run["ppl"]):
                clock = time.perf_counter()
                result, config = select(model, tokenizer, source, budget, own, wikitext / "valid.txt")
                here = common.machine()
                run["measured"] = {k: here[k] for k in ("commit", "date", "command", "load_average_at_start")}
                run.update(layers=sorted(layer_index(n) for n in result.plan.remove), seconds=time.perf_counter() - clock,
                           compensation=_brief(result.report["compensation"]),
                           calibration=result.report["calibration"]["source"],
                           passes=result.report["timings_in_passes"].get("total"))
                log(f"{key}: layers {compress(run['layers'])}, {run['seconds']:.0f} s; evaluating the shipped model")
                run["ppl"]["new"] = evaluate(result.model, windows)
                del result
                save()
            names = [f"model.layers.{i}" for i in run["layers"]]
            if "none" in choices and "none" not in run["ppl"]:
                run["ppl"]["none"] = evaluate(remove_layers(model, names).model, windows)
                save()
            if "single" in choices and "single" not in run["ppl"] and source == "own" and "new" in run["ppl"]:  # one source: single is what the run ships
                run["ppl"]["single"] = run["ppl"]["new"]
                run["single"] = {"same_as": "new"}
            if "single" in choices and "single" not in run["ppl"]:
                calibration, fields = calibration_of(source, own, wikitext / "valid.txt")
                fits, run["single"] = single_source_fits(model, tokenizer, PruneConfig(remove=budget, **fields),
                                                         calibration, names)
                pruned = remove_layers(model, names)
                apply_compensation(pruned, names, fits)
                run["ppl"]["single"] = evaluate(pruned.model, windows)
                save()
            log(f"{key}: {json.dumps(run['ppl'])}")
            save()
    save()


LOG_LINE = re.compile(r"^\[domains [0-9:]+\] (\w+):(\d+): (.*)$")


def merge_log(store: dict, text: str) -> None:
    """The layers ("key: layers 4..6,13..18, ...") and perplexities ("key: {json}") a run's log printed."""
    for line in text.splitlines():
        found = LOG_LINE.match(line)
        if not found:
            continue
        source, budget, rest = found.group(1), int(found.group(2)), found.group(3)
        run = store["runs"].setdefault(f"{source}:{budget}", {"source": source, "budget": budget, "ppl": {}})
        if rest.startswith("layers "):
            run.setdefault("layers", expand(rest.split(" ")[1].rstrip(",")))
        elif rest.startswith("{"):
            run["ppl"] = {**json.loads(rest), **run.get("ppl", {})}


def expand(compressed: str) -> list[int]:
    """"4..6,13..18" -> [4, 5, 6, 13, ..., 18] (core.names.compress's format)."""
    out = []
    for part in compressed.split(","):
        first, _, last = part.partition("..")
        out += list(range(int(first), int(last or first) + 1))
    return out


def _brief(compensation: dict) -> dict:
    """What the shipped run's report says about compensation, without the cross-validation grids."""
    return {"applied": compensation.get("applied"), "helps": compensation.get("helps"),
            "gaps": [{"fold_into": g["fold_into"], "ridge": g["ridge"], "held_out_error_ratio": g.get("held_out_error_ratio")}
                     for g in compensation.get("gaps", [])],
            "sources": compensation.get("sources"), "dropped": compensation.get("dropped"),
            "gaps_without_map": compensation.get("gaps_without_map")}


# --------------------------------------------------------------------------- rendering


def render(store: dict) -> str:
    dense = store.get("dense", {})
    kinds = [k for k in KINDS if k in dense]
    out = ["# Quality across kinds of text: SmolLM2-135M", ""]
    if not store.get("complete"):
        out += ["**Run in progress: the tables below are partial.**", ""]
    out += ["Written by `benchmarks/domains.py`; do not edit the numbers by hand.", "",
            "The store's first run:", "", common.machine_markdown(store["machine"]), "",
            "Each source's line below the tables names the commit its selection ran at, where the store recorded it. "
            "Commands that filled this store (in parallel processes on the shared machine; `--from-log` merged what "
            "a process printed where another process's write overwrote it): "
            + "; ".join(f"`{c}`" for c in dict.fromkeys(store.get("commands", []))), "",
            "Layers chosen once per calibration source and budget by `prune_model` with the CLI's defaults; each "
            "compensation choice is applied to those layers. `none`: no map; `single`: maps fitted on the calibration "
            "windows as one source (the compensation before issue 24); `new`: what the run ships (maps checked on the "
            "held-out windows of every calibration source, the model's own text included). Perplexity; lower is better. "
            "No calibration source uses any of these texts (`own held-out`: windows the calibration's sampler never drew).",
            "", "Dense: " + ", ".join(f"{k} {dense[k]:.2f}" for k in kinds), ""]
    runs = store.get("runs", {})
    for budget in sorted({r["budget"] for r in runs.values()}):
        out += [f"## {budget} of 30 layers removed", ""]
        header = ["calibration", "layers", "compensation", *kinds, "vs none (geometric mean)"]
        rows = []
        for source in SOURCES:
            run = runs.get(f"{source}:{budget}")
            if not run or "layers" not in run:
                continue
            for choice in CHOICES:
                ppl = run["ppl"].get(choice)
                if ppl is None:
                    continue
                none = run["ppl"].get("none")
                ratio = ""
                if none and choice != "none":
                    import math

                    ratio = f"{math.exp(sum(math.log(ppl[k] / none[k]) for k in kinds) / len(kinds)):.3f}"
                rows.append([source, compress(run["layers"]), choice, *(f"{ppl[k]:.2f}" for k in kinds), ratio])
        out += [common.table(header, rows), ""]
        notes = []
        for source in SOURCES:
            run = runs.get(f"{source}:{budget}")
            if not run or "compensation" not in run:
                continue
            c = run["compensation"]
            per = "; ".join(f"{s}: {v['uncompensated']:.4f} -> {v['folded']:.4f} (all maps {v['compensated']:.4f})"
                            for s, v in (c.get("sources") or {}).items())
            dropped = ", ".join(d["gap"] for d in c.get("dropped") or []) or "none"
            notes.append(f"- `{source}`: {run.get('calibration')}; held-out loss per source {per}; "
                         f"maps dropped by the guard: {dropped}; selection and compensation "
                         f"{run.get('seconds', 0):.0f} s, {run.get('passes') or 0:.2f} passes"
                         + (f"; selected at `{run['measured']['commit']}` on {run['measured']['date']}" if "measured" in run else ""))
        out += notes + [""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
