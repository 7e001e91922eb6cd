"""Measure the calibration-loss landscape of SmolLM2 (memoised): the full greedy (SLEB's
search, every candidate at every step) on the plain and on the compensated loss, the free
candidate sets, and every contiguous run. Data for designing and testing the selector.

    python research/landscape.py --source wiki --what free,greedy-plain,greedy-cosine,runs --k 9
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import research.common as C  # noqa: E402
from lorp_fx.selection.registry import select  # noqa: E402


def greedy(loss, eligible, k):
    removed, path = [], []
    for _ in range(k):
        values = {b: loss(C.layer_names(removed + [b])) for b in eligible if b not in removed}
        best = min(values, key=lambda b: (values[b], b))
        removed.append(best)
        path.append((best, values[best]))
        print(f"  step {len(removed)}: +{best} -> {values[best]:.5f}", flush=True)
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="wiki")
    parser.add_argument("--what", default="free,greedy-plain,greedy-cosine,runs")
    parser.add_argument("--k", type=int, default=9)
    parser.add_argument("--n", type=int, default=32)
    args = parser.parse_args()
    C.threads(1)
    stats = C.statistics(args.source, args.n)
    eligible = list(range(1, stats.n_blocks - 1))
    for what in args.what.split(","):
        clock = time.time()
        if what == "free":
            for mode in ("plain", "cosine"):
                loss = C.MemoLoss(args.source, mode, args.n)
                for k in (3, 6, 9):
                    for method in ("shortgpt", "uidl", "streamline"):
                        R = select(stats, k, method=method).remove
                        print(f"{mode} k={k} {method} {C.layer_indices(R)} {loss(R):.5f}", flush=True)
        elif what.startswith("greedy-"):
            mode = what.split("-", 1)[1]
            print(f"greedy on {mode}", flush=True)
            greedy(C.MemoLoss(args.source, mode, args.n), eligible, args.k)
        elif what == "runs":
            loss = C.MemoLoss(args.source, "cosine", args.n)
            for k in (3, 6, 9):
                for start in range(1, stats.n_blocks - k):
                    R = list(range(start, start + k))
                    print(f"cosine run {R[0]}..{R[-1]} {loss(C.layer_names(R)):.5f}", flush=True)
        print(f"[{what}: {time.time() - clock:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
