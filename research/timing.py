"""Selection time of `lorp` against SLEB's, side by side in one process, and in plain passes.

The unit: one plain forward pass of the traced graph over the 32 x 256 calibration windows
(timed here, twice). SLEB runs once to the largest budget with `observe.calibration_loss`
(the CLI's loss: a pruned graph and a full forward per candidate), its time at each smaller
budget read off the same run (its greedy steps are nested). `lorp` runs cold at every budget
(a fresh `CandidateLoss`: its caching pass is counted), plain and compensated, once before and
once after SLEB, so that a change of load on the shared machine shows.

    python research/timing.py --source wiki --ks 3,6,9 --out research/results/timing-wiki.json
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import research.common as C  # noqa: E402
from lorp_fx.judge.candidates import CandidateLoss  # noqa: E402
from lorp_fx.judge.loss import calibration_loss  # noqa: E402
from lorp_fx.selection.registry import select  # noqa: E402


def plain_pass_seconds(graph, batches) -> float:
    import torch

    times = []
    with torch.no_grad():
        for _ in range(2):
            clock = time.perf_counter()
            for batch in batches:
                graph(**batch)
            times.append(time.perf_counter() - clock)
    return sum(times) / len(times)


def run_lorp(stats, graph, batches, k: int, compensation):
    clock = time.perf_counter()
    evaluator = CandidateLoss(graph, batches, loss_windows=8, compensation=compensation)
    setup = time.perf_counter() - clock
    plan = select(stats, k, method="lorp", loss_fn=evaluator)
    total = time.perf_counter() - clock
    return {"k": k, "compensation": compensation, "remove": C.layer_indices(plan.remove), "loss": plan.details["loss"],
            "evaluations": plan.details["evaluations"], "measurements": evaluator.measurements,
            "setup_s": setup, "search_s": total - setup, "total_s": total,
            "steps": [len(s["candidates"]) for s in plan.details["steps"]], "chosen_from": plan.details["chosen_from"]}


def run_sleb(stats, graph, loss_batches, k_max: int, memo: C.Memo):
    loss = calibration_loss(graph, loss_batches)
    marks = []
    clock = time.perf_counter()

    def timed(names):
        value = loss(names)
        memo.put(f"plain:{C.set_key(C.layer_indices(names))}", value)
        marks.append(time.perf_counter() - clock)
        return value

    plan = select(stats, k_max, method="sleb", loss_fn=timed)
    per_step, done = [], 0
    for step in plan.details["steps"]:
        done += len(step["candidates"])
        per_step.append(marks[done - 1])
    order = [int(s["removed"].rsplit(".", 1)[1]) for s in plan.details["steps"]]
    return {"order": order, "cumulative_s": per_step, "evaluations": len(marks)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="wiki")
    parser.add_argument("--ks", default="3,6,9")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    C.threads(1)
    ks = [int(k) for k in args.ks.split(",")]
    from lorp_fx.calibration.graph_observer import collect_statistics

    model, _ = C.model()
    batches = C.batches(C.calibration(args.source))
    clock = time.perf_counter()
    stats, graph = collect_statistics(model, batches, progress=False)
    result = {"statistics_s": time.perf_counter() - clock, "load_start": os.getloadavg()}
    result["plain_pass_s"] = plain_pass_seconds(graph, batches)
    result["lorp_before"] = [run_lorp(stats, graph, batches, k, c) for c in (None, "cosine") for k in ks]
    print(json.dumps(result), flush=True)
    result["sleb"] = run_sleb(stats, graph, batches[:2], max(ks), C.Memo(f"loss_{args.source}_32_8"))
    print(json.dumps(result["sleb"]), flush=True)
    result["lorp_after"] = [run_lorp(stats, graph, batches, k, c) for c in (None, "cosine") for k in ks]
    result["plain_pass_after_s"] = plain_pass_seconds(graph, batches)
    result["load_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
