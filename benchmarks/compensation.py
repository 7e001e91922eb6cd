"""Compensation (issue 8) on SmolLM2: perplexity of pruned models without and with a folded linear map.

    python benchmarks/compensation.py                       # the table: none / lstsq / cosine
    python benchmarks/compensation.py --variants            # + the ablations of docs/compensation.md
    python benchmarks/compensation.py --selectors shortgpt --budgets 9 --methods cosine

Protocol (../shared/REFERENCE.md): calibration = the first 32 x 256 tokens of WikiText-2
valid.txt, evaluation = perplexity on the first 40 x 512 tokens of test.txt, both
tokenised with the model's tokenizer, fp32 on CPU. One statistics pass
(`collect_statistics`) serves every selector; loss-judged selectors get
`calibration_loss` on the first 8 calibration windows (as benchmarks/quality.py). Each
plan is applied with `remove_layers` ("none") or with `compensate` on the same
calibration windows ("lstsq", "cosine"), and evaluated with `lorp_fx.judge.perplexity.perplexity`.

`--variants` adds, for a few removal sets, the alternatives that docs/compensation.md
discusses: other ridge strengths, sequential fitting (the pruned model's view), and an
exact cosine objective fitted by L-BFGS on stored activations (ReplaceMe's cosine; not
in the library because it needs the activations in memory).

Every perplexity is kept in a JSON cache (default /tmp/lorp8/compensation-cache.json,
keyed by the removed set and every setting that changes the model), so an interrupted
run resumes; `--fresh` ignores it. The results file is rewritten after every number.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from lorp_fx import SELECTORS, select  # noqa: E402
from lorp_fx.arch.surgery import count_parameters, remove_layers  # noqa: E402
from lorp_fx.calibration.batches import token_batches  # noqa: E402
from lorp_fx.calibration.graph_observer import collect_statistics  # noqa: E402
from lorp_fx.compensation.fit import (  # noqa: E402
    DEFAULT_RIDGE,
    GapFit,
    apply_compensation,
    compensate,
    fit_compensation,
)
from lorp_fx.core.names import compress  # noqa: E402
from lorp_fx.io.text import text_windows  # noqa: E402
from lorp_fx.judge.loss import calibration_loss  # noqa: E402
from lorp_fx.judge.perplexity import perplexity  # noqa: E402
from lorp_fx.selection.registry import options_for  # noqa: E402

DEFAULT_SELECTORS = "shortgpt,uidl,streamline,lorp-paper,lorp"
# REFERENCE.md, uncompensated perplexity on this protocol (a cross-check of the "none" column).
REFERENCE_NONE = {
    ("shortgpt", 6): 57.01, ("shortgpt", 9): 110.28, ("lorp-paper", 6): 8778, ("lorp-paper", 9): 15245,
    ("streamline", 6): 65.15, ("streamline", 9): 212.7, ("uidl", 6): 65.15, ("uidl", 9): 212.7,
}
CACHE_VERSION = 1  # bump when compensate() changes what it computes


def ridge_value(text: str):
    return text if text == "auto" else float(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    common.add_text_arguments(p)
    p.add_argument("--loss-samples", type=int, default=8)
    p.add_argument("--selectors", default=DEFAULT_SELECTORS)
    p.add_argument("--budgets", default="6,9")
    p.add_argument("--methods", default="none,lstsq,cosine")
    p.add_argument("--ridge", type=ridge_value, default=DEFAULT_RIDGE, help="'auto' (cross-validated per gap) or a number")
    p.add_argument("--sequential", action="store_true", help="fit the main table's maps sequentially (pruned view)")
    p.add_argument("--variants", action="store_true", help="also run the ablations of docs/compensation.md")
    p.add_argument("--variant-cases", default="streamline:9,shortgpt:9,lorp:9")
    p.add_argument("--cache", type=Path, default=Path("/tmp/lorp8/compensation-cache.json"))
    p.add_argument("--fresh", action="store_true", help="ignore cached perplexities")
    p.add_argument("--out", type=Path, default=common.RESULTS / "compensation-smollm2.md")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.calib_file is None or args.eval_file is None:
        p.error("--calib-file and --eval-file are required: ../shared/data/wikitext-2 is absent")
    args.budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    args.selectors = [s.strip() for s in args.selectors.split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return args


def log(message: str) -> None:
    print(f"[compensation {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Cache:
    def __init__(self, path: Path, fresh: bool, protocol: dict):
        self.path, self.protocol = path, protocol
        self.data = {}
        if path.is_file() and not fresh:
            loaded = json.loads(path.read_text())
            if loaded.get("protocol") == protocol:
                self.data = loaded.get("entries", {})

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value: dict) -> None:
        self.data[key] = value
        common.write_text(self.path, json.dumps({"protocol": self.protocol, "entries": self.data}, indent=1))


def layer_indices(names: list[str]) -> list[int]:
    return [int(n.rpartition(".")[2]) for n in names]


# --------------------------------------------------------------------------- exact cosine (research only)


@torch.no_grad()
def gap_activations(model, removed: list[str], batches: list[torch.Tensor]):
    """Per gap of a Llama-family layer removal: (fold layer, x, m, y) on the calibration tokens.

    x: the skip input of the MLP of the layer before the gap, m: that MLP's output,
    y: the dense state after the gap. Kept in memory: only for this research comparison.
    """
    layers = model.model.layers
    removed_idx = sorted(layer_indices(removed))
    runs = []
    for i in removed_idx:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    store = {}
    handles = []

    def pre(key):
        def hook(module, args, kwargs):
            store.setdefault(key, []).append((args[0] if args else kwargs["hidden_states"]).detach().reshape(-1, args[0].shape[-1] if args else kwargs["hidden_states"].shape[-1]))
        return hook

    def out(key):
        def hook(module, args, kwargs, output):
            o = output[0] if isinstance(output, tuple) else output
            store.setdefault(key, []).append(o.detach().reshape(-1, o.shape[-1]))
        return hook

    for a, b in runs:
        handles.append(layers[a - 1].post_attention_layernorm.register_forward_pre_hook(pre(("x", a)), with_kwargs=True))
        handles.append(layers[a - 1].register_forward_hook(out(("xm", a)), with_kwargs=True))
        if b + 1 < len(layers):
            handles.append(layers[b + 1].register_forward_pre_hook(pre(("y", a)), with_kwargs=True))
        else:
            handles.append(layers[b].register_forward_hook(out(("y", a)), with_kwargs=True))
    try:
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    result = []
    for a, b in runs:
        x = torch.cat(store[("x", a)])
        m = torch.cat(store[("xm", a)]) - x
        y = torch.cat(store[("y", a)])
        result.append((a - 1, [f"model.layers.{i}" for i in range(a, b + 1)], x, m, y))
    return result


def exact_cosine_fit(x, m, y, init: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """T minimising mean_t (1 - cos(x_t + T m_t, y_t)), by full-batch L-BFGS from `init`."""
    t = init.clone().float().requires_grad_(True)
    target = torch.nn.functional.normalize(y.float(), dim=1)
    x, m = x.float(), m.float()
    # No gradient/change tolerances: the mean distance is ~1e-2 and its gradient entries tiny,
    # so L-BFGS's defaults would stop before the first step.
    optimizer = torch.optim.LBFGS([t], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=0.0, tolerance_change=0.0)

    def closure():
        optimizer.zero_grad()
        z = x + m @ t.T
        loss = 1e3 * (1.0 - (torch.nn.functional.normalize(z, dim=1) * target).sum(1).mean())
        loss.backward()
        return loss

    optimizer.step(closure)
    return t.detach().double()


def mean_cosine_distance(x, m, y, t: torch.Tensor) -> float:
    z = x.double() + m.double() @ t.T
    return float(1.0 - torch.nn.functional.cosine_similarity(z, y.double(), dim=1).mean())


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = common.machine(" ".join(["compensation.py", *(sys.argv[1:] if argv is None else argv)]))
    progress = not args.quiet
    protocol = {
        "model": args.model, "calib": [str(args.calib_file), args.calib_samples, args.calib_len],
        "eval": [str(args.eval_file), args.eval_samples, args.eval_len], "batch": args.batch_size,
        "version": CACHE_VERSION,
    }
    cache = Cache(args.cache, args.fresh, protocol)
    from lorp_fx.io.models import load_model

    log(f"loading {args.model}")
    model, tokenizer = load_model(args.model)
    model.eval()
    calib = text_windows(tokenizer, [args.calib_file], args.calib_samples, args.calib_len)
    evaluation = text_windows(tokenizer, [args.eval_file], args.eval_samples, args.eval_len)
    calib_batches = list(calib.split(args.batch_size))

    results = {"machine": info, "protocol": protocol, "args": {k: str(v) for k, v in vars(args).items()},
               "rows": [], "variants": [], "notes": [], "reused": 0}

    def write() -> None:
        common.write_text(args.out, render(results, args))

    def ppl_of(key: str, build) -> dict:
        hit = cache.get(key)
        if hit is not None:
            results["reused"] += 1
            return hit
        start = time.perf_counter()
        pruned, extra = build()
        built = time.perf_counter() - start
        value = perplexity(pruned, evaluation, batch_size=args.batch_size, progress=progress)
        entry = {"ppl": value, "params": count_parameters(pruned), "fit_seconds": built,
                 "eval_seconds": time.perf_counter() - start - built, **extra}
        cache.put(key, entry)
        return entry

    def compensated(removed, method, ridge, sequential):
        def build():
            pruned, fits, _ = compensate(model, removed, calib_batches, method, ridge=ridge, sequential=sequential,
                                         progress=progress)
            return pruned, {"fits": [f.to_dict() for f in fits]}
        key = json.dumps(["comp", sorted(removed), method, ridge, sequential])
        return ppl_of(key, build)

    def plain(removed):
        return ppl_of(json.dumps(["none", sorted(removed)]), lambda: (remove_layers(model, removed).model if removed else model, {}))

    log("dense")
    results["dense"] = plain([])
    write()

    log("statistics pass for the selectors")
    batches = token_batches(calib, args.batch_size)
    stats, graph = collect_statistics(model, batches, progress=progress)
    loss_windows = calib[: args.loss_samples]
    cached_loss = calibration_loss(graph, token_batches(loss_windows, args.batch_size))

    plans: dict[tuple[str, int], list[str]] = {}
    missing = [s for s in args.selectors if s not in SELECTORS]
    if missing:
        results["notes"].append(
            f"not registered in lorp_fx.SELECTORS at this commit, so not run: {', '.join(missing)}"
        )
    for budget in args.budgets:
        for selector in [s for s in args.selectors if s in SELECTORS]:
            start = time.perf_counter()
            plan = select(stats, budget, method=selector, **options_for(selector, loss_fn=cached_loss))
            plans[(selector, budget)] = list(plan.remove)
            log(f"{selector} {budget}: {compress(sorted(layer_indices(plan.remove)))} ({time.perf_counter() - start:.1f} s)")
            row = {"selector": selector, "budget": budget, "removed": layer_indices(plan.remove)}
            results["rows"].append(row)
            for method in args.methods:
                if method == "none":
                    entry = plain(plan.remove)
                else:
                    entry = compensated(plan.remove, method, args.ridge, args.sequential)
                row[method] = entry
                log(f"  {method}: ppl {entry['ppl']:.2f}")
                write()

    if args.variants:
        run_variants(args, model, calib_batches, plans, results, compensated, plain, ppl_of, write)
    results["complete"] = True
    write()
    log(f"wrote {args.out}")
    return results


def run_variants(args, model, calib_batches, plans, results, compensated, plain, ppl_of, write) -> None:
    cases = []
    for case in args.variant_cases.split(","):
        selector, _, budget = case.partition(":")
        if (selector, int(budget)) in plans:
            cases.append((selector, int(budget)))
        else:
            results["notes"].append(f"variant case {case}: no such plan in this run, skipped")
    for selector, budget in cases:
        removed = plans[(selector, budget)]
        log(f"variants on {selector} {budget}")
        specs = [
            ("cosine, ridge 1e-4", "cosine", 1e-4, False),
            ("cosine, ridge 1e-2", "cosine", 1e-2, False),
            ("cosine, ridge 1e-1", "cosine", 1e-1, False),
            ("cosine, ridge 1", "cosine", 1.0, False),
            ("cosine, ridge auto, sequential (pruned view)", "cosine", "auto", True),
            ("lstsq, ridge 1", "lstsq", 1.0, False),
        ]
        for label, method, ridge, sequential in specs:
            entry = compensated(removed, method, ridge, sequential)
            results["variants"].append({"selector": selector, "budget": budget, "variant": label, **entry})
            log(f"  {label}: ppl {entry['ppl']:.2f}")
            write()

        def exact_build():
            # Start from the closed-form (token-normalised, ridge auto) solution, refine the true cosine objective.
            closed = fit_compensation(model, removed, calib_batches, "cosine")
            gaps = gap_activations(model, removed, calib_batches)
            fits, details = [], []
            for (fold_layer, names, x, m, y), closed_fit in zip(gaps, closed):
                assert closed_fit.fold_into == f"model.layers.{fold_layer}.mlp"
                init = closed_fit.transform
                t = exact_cosine_fit(x, m, y, init)
                details.append({"fold_layer": fold_layer, "cos_distance_none": mean_cosine_distance(x, m, y, torch.eye(x.shape[1], dtype=torch.float64)),
                                "cos_distance_closed_form": mean_cosine_distance(x, m, y, init),
                                "cos_distance_exact": mean_cosine_distance(x, m, y, t)})
                fits.append(GapFit(names, f"model.layers.{fold_layer}.mlp", [], t, x.shape[0], math.nan, math.nan))
            return apply_compensation(remove_layers(model, removed), removed, fits), {"gaps": details}

        key = json.dumps(["exact-cosine", sorted(removed), "auto"])
        entry = ppl_of(key, exact_build)
        results["variants"].append({"selector": selector, "budget": budget, "variant": "exact cosine (L-BFGS on stored activations)", **entry})
        log(f"  exact cosine: ppl {entry['ppl']:.2f}")
        write()


# --------------------------------------------------------------------------- rendering


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def _change(before: float, after: float) -> str:
    return f"{100.0 * (after - before) / before:+.0f}%"


def render(results: dict, args) -> str:
    info = results["machine"]
    lines = [
        "# Compensation on SmolLM2-135M-Instruct: perplexity without and with a folded linear map",
        "",
        "Written by `benchmarks/compensation.py` from its own run (do not edit by hand). "
        "Method and discussion: docs/compensation.md.",
        "",
        common.machine_markdown(info),
        f"- protocol: calibration = first {args.calib_samples} x {args.calib_len} tokens of `{Path(args.calib_file).name}`, "
        f"perplexity on the first {args.eval_samples} x {args.eval_len} tokens of `{Path(args.eval_file).name}` "
        "(WikiText-2), fp32 on CPU; compensation fitted on the calibration windows only",
        f"- compensation: ridge {args.ridge} (x tr(A)/d, towards the identity; auto = 4-fold cross-validation per gap), "
        + ("sequential (pruned view)" if args.sequential else "statistics of the dense model, one pass"),
        f"- perplexities reused from the cache of an earlier run with the same protocol: {results['reused']}",
        "",
    ]
    if "dense" in results:
        lines += [f"Dense: **{results['dense']['ppl']:.2f}** ({results['dense']['params']:,} parameters).", ""]
    methods = args.methods
    headers = ["selector", "removed", "layers"] + [f"ppl {m}" for m in methods]
    if "none" in methods:
        headers += [f"{m} vs none" for m in methods if m != "none"]
    headers += ["REFERENCE none", "params (all columns)"]
    rows = []
    for row in results["rows"]:
        cells = [row["selector"], row["budget"], compress(sorted(row["removed"]))]
        cells += [_fmt(row[m]["ppl"]) if m in row else "" for m in methods]
        if "none" in methods:
            cells += [_change(row["none"]["ppl"], row[m]["ppl"]) if "none" in row and m in row else "" for m in methods if m != "none"]
        ref = REFERENCE_NONE.get((row["selector"], row["budget"]))
        cells.append(_fmt(ref) if ref is not None else "")
        params = {row[m]["params"] for m in methods if m in row}
        cells.append(f"{params.pop():,}" if len(params) == 1 else "differ: " + ", ".join(map(str, sorted(params))))
        rows.append(cells)
    lines += ["## Perplexity", "", common.table(headers, rows), ""]

    fit_rows = []
    for row in results["rows"]:
        for m in methods:
            for fit in (row.get(m) or {}).get("fits", []) or []:
                gap = sorted({int(re.findall(r"\.(\d+)", n)[-1]) for n in fit["removed"]})
                ridge = fit.get("ridge")
                fit_rows.append([row["selector"], row["budget"], m, compress(sorted(gap)), fit["fold_into"],
                                 f"{fit['error_before']:.4f}", f"{fit['error_after']:.4f}",
                                 "" if ridge is None else f"{ridge:g}", fit["tokens"]])
    if fit_rows:
        lines += [
            "## Fits",
            "",
            "Relative calibration error at each gap, sum w |x + T m - y|^2 / sum w |y|^2 with the method's token weights "
            "(before = the uncompensated pruned state, T = I; after = in-sample); `ridge` = the one used (chosen by "
            "cross-validation with ridge auto).",
            "",
            common.table(["selector", "removed", "method", "gap", "folded into", "error before", "error after", "ridge", "tokens"], fit_rows),
            "",
        ]
    if results["variants"]:
        var_rows = []
        for v in results["variants"]:
            none = next((r["none"]["ppl"] for r in results["rows"] if r["selector"] == v["selector"] and r["budget"] == v["budget"] and "none" in r), None)
            extra = ""
            if "gaps" in v:
                extra = "; ".join(
                    f"layer {g['fold_layer']}: 1-cos {g['cos_distance_none']:.4f} -> {g['cos_distance_closed_form']:.4f} (closed form) -> {g['cos_distance_exact']:.4f}"
                    for g in v["gaps"]
                )
            var_rows.append([v["selector"], v["budget"], v["variant"], _fmt(v["ppl"]), _change(none, v["ppl"]) if none else "",
                             f"{v['fit_seconds']:.0f}", extra])
        lines += [
            "## Variants",
            "",
            "Same protocol. `fit s` = the seconds compensation took (statistics passes and solves), on this shared machine. "
            "The exact cosine row reports the mean calibration cosine distance at each gap.",
            "",
            common.table(["selector", "removed", "variant", "ppl", "vs none", "fit s", "calibration 1 - cos"], var_rows),
            "",
        ]
    if results["notes"]:
        lines += ["## Notes from the run", ""] + [f"- {n}" for n in results["notes"]] + [""]
    if not results.get("complete"):
        lines += ["_Run in progress: this file is rewritten after every number._", ""]
    lines += [common.kept_notes(args.out) or "\n".join([common.NOTES_HEADING, "", common.NOTES_MARKER, "", "(none yet)", ""])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
