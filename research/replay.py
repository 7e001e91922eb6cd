"""Run `lorp` on SmolLM2 at 3, 6 and 9 layers against the memoised losses (measuring what is
missing), and show where it lands against the free sets and the full greedy (SLEB's search).

    python research/replay.py --source wiki --mode cosine [--width 2]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import research.common as C  # noqa: E402
from lorp_fx.selection.registry import select  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="wiki")
    parser.add_argument("--mode", default="cosine")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--width", type=int, default=2)
    parser.add_argument("--ks", default="3,6,9")
    args = parser.parse_args()
    C.threads(1)
    stats = C.statistics(args.source, args.n)
    for k in map(int, args.ks.split(",")):
        loss = C.MemoLoss(args.source, args.mode, args.n)
        plan = select(stats, k, method="lorp", loss_fn=loss, width=args.width)
        d = plan.details
        steps = [(s["removed"].rsplit(".", 1)[1], len(s["candidates"]), len(s["widened"])) for s in d["steps"]]
        free = {name: round(v["loss"], 5) for name, v in d["free_sets"].items()}
        print(json.dumps({"k": k, "mode": args.mode, "chosen": C.layer_indices(plan.remove), "loss": round(d["loss"], 5),
                          "from": d["chosen_from"], "evaluations": d["evaluations"], "computed": loss.computed,
                          "free": free, "steps (removed, measured, widened)": steps}), flush=True)


if __name__ == "__main__":
    main()
