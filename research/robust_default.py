"""The default selector on SmolLM2 under the quality benchmark's protocol: rows for the report.

For each budget k: `lorp` on the plain calibration loss (compensation off) and on the
compensated loss (the CLI default), the chosen set's perplexity on test, test-held and
valid-held windows, uncompensated / with dense-view cosine maps / with sequential cosine maps
(both fitted on every calibration window, as shipped). Losses come from the disk memo when an
earlier run measured them (selection *time* is measured by research/timing.py instead).

    python research/robust_default.py --source wiki --n 32 --ks 3,6,9
    python research/robust_default.py --source self --n 32 --ks 3,6,9
    python research/robust_default.py --source wiki --n 32 --ks 3,6,9 --free   # + the free sets, same text
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import research.common as C  # noqa: E402
from lorp_fx.selection.registry import select  # noqa: E402

RESULTS = C.ROOT / "research" / "results"


def select_row(source: str, n: int, k: int, mode: str, width: int = 2) -> dict:
    stats = C.statistics(source, n)
    loss = C.MemoLoss(source, mode, n)
    plan = select(stats, k, method="lorp", loss_fn=loss, width=width)
    d = plan.details
    row = {"source": source, "n": n, "k": k, "objective": mode, "remove": C.layer_indices(plan.remove),
           "cal_loss": d["loss"], "chosen_from": d["chosen_from"], "evaluations": d["evaluations"],
           "measured_per_step": [len(s["candidates"]) for s in d["steps"]],
           "free": {name: {"remove": C.layer_indices(v["remove"]), "loss": v["loss"]} for name, v in d["free_sets"].items()}}
    if mode == "cosine":  # does compensation help the chosen set, held out?
        plain = C.MemoLoss(source, "plain", n)(plan.remove)
        row["compensation"] = {"compensated_loss": d["loss"], "uncompensated_loss": plain, "apply": d["loss"] < plain}
    return row


def evaluate(row: dict, variants, evals) -> None:
    names = C.layer_names(row["remove"])
    ev = C.evaluator(row["source"], row["n"], "cosine")
    row["ppl"] = {}
    for variant in variants:
        tag = f"{row['source']}/{row['n']}/{variant}"
        fits = None
        if variant != "none":
            key = f"{tag}:{C.set_key(row['remove'])}"
            memo = C.Memo("variant_losses")
            if memo.get(key) is None or any(C.Memo("ppl").get(f"{w}:{tag}:{C.set_key(row['remove'])}") is None for w in evals):
                fits = ev.final_fits(names, sequential=variant == "seq-final")
                if memo.get(key) is None:
                    memo.put(key, ev.loss_with(names, fits))
            row.setdefault("final_cal_loss", {})[variant] = memo.get(key)
        row["ppl"][variant] = {w: C.perplexity(row["remove"], fits, w, tag) for w in evals}
        print(json.dumps({"k": row["k"], "objective": row["objective"], "variant": variant, **row["ppl"][variant]}), flush=True)


def evaluate_free(row: dict, evals) -> None:
    """Test the free sets the selector measured (ShortGPT's, the best contiguous run) on the same
    calibration text, uncompensated and with cosine maps fitted as shipped: the comparison a user
    would make with the same windows, in perplexity rather than calibration loss."""
    ev = C.evaluator(row["source"], row["n"], "cosine")
    row["free_ppl"] = {}
    for name in ("shortgpt", "uidl"):
        remove = row["free"][name]["remove"]
        tag = f"{row['source']}/{row['n']}/cos-final"
        needed = any(C.Memo("ppl").get(f"{w}:{tag}:{C.set_key(remove)}") is None for w in evals)
        fits = ev.final_fits(C.layer_names(remove)) if needed else None
        row["free_ppl"][name] = {
            "remove": remove,
            "none": {w: C.perplexity(remove, None, w, f"{row['source']}/{row['n']}/none") for w in evals},
            "cos-final": {w: C.perplexity(remove, fits, w, tag) for w in evals},
        }
        print(json.dumps({"k": row["k"], "free": name, **row["free_ppl"][name]}), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="wiki")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--ks", default="3,6,9")
    parser.add_argument("--objectives", default="plain,cosine")
    parser.add_argument("--evals", default="valid-held,test,test-held")
    parser.add_argument("--variants", default="cos-final,seq-final")
    parser.add_argument("--free", action="store_true",
                        help="also test the free sets on the same text (a stored row is reused, not reselected)")
    args = parser.parse_args()
    C.threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"rows-{args.source}-{args.n}.json"
    rows = json.loads(out.read_text()) if out.exists() else {}
    for k in map(int, args.ks.split(",")):
        for mode in args.objectives.split(","):
            if args.free and f"{k}:{mode}" in rows:
                if mode == "cosine":
                    evaluate_free(rows[f"{k}:{mode}"], ["valid-held", "test"])
                    out.write_text(json.dumps(rows, indent=1))
                continue
            row = select_row(args.source, args.n, k, mode)
            print(json.dumps({key: row[key] for key in ("k", "objective", "remove", "cal_loss", "evaluations")}), flush=True)
            variants = ["none"] if mode == "plain" else args.variants.split(",")
            evaluate(row, variants, args.evals.split(","))
            if args.free and mode == "cosine":
                evaluate_free(row, ["valid-held", "test"])
            rows[f"{k}:{mode}"] = row
            out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
