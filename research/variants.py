"""Perplexity of removal sets under each compensation variant (memoised in research/cache/ppl.json).

Variants: none; cos-others / cos-final (dense-view cosine maps fitted on the windows other than
the 8 loss windows / on every window, as compensate() does); seq-others / seq-final (fitted gap
after gap from the pruned model's view, as compensate(..., sequential=True)).

    python research/variants.py --source wiki --sets "14,15,17;13,14,15" --variants none,cos-others --evals valid-held
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import research.common as C  # noqa: E402


def fits_for(source: str, n: int, variant: str, names):
    """none; cos-others / seq-others: fitted on the windows other than the loss windows;
    cos-final / seq-final: fitted on every window (CandidateLoss.final_fits)."""
    if variant == "none":
        return []
    method, fit_on = variant.split("-")
    ev = C.evaluator(source, n, "cosine")
    if fit_on == "final":
        return ev.final_fits(names, sequential=method == "seq")
    return ev.sequential_fits(names) if method == "seq" else ev.fits(names)


def calibration_loss(source: str, n: int, variant: str, names, fits) -> float:
    """Loss on the loss windows (held out for *-others, in-sample for *-final)."""
    return C.evaluator(source, n, "cosine").loss_with(names, fits)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="wiki")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--sets", required=True, help="sets separated by ';', layers by ','")
    parser.add_argument("--variants", default="none,cos-others")
    parser.add_argument("--evals", default="valid-held")
    args = parser.parse_args()
    C.threads(1)
    memo = C.Memo("variant_losses")
    for text in args.sets.split(";"):
        indices = [int(i) for i in text.split(",")]
        names = C.layer_names(indices)
        for variant in args.variants.split(","):
            tag = f"{args.source}/{args.n}/{variant}"
            fits = None
            key = f"{tag}:{C.set_key(indices)}"
            if memo.get(key) is None:
                fits = fits_for(args.source, args.n, variant, names)
                memo.put(key, calibration_loss(args.source, args.n, variant, names, fits))
            row = {"set": indices, "variant": variant, "cal_loss": round(memo.get(key), 5)}
            for which in args.evals.split(","):
                if C.Memo("ppl").get(f"{which}:{tag}:{C.set_key(indices)}") is None and fits is None:
                    fits = fits_for(args.source, args.n, variant, names)
                row[which] = round(C.perplexity(indices, fits, which, tag), 3)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
