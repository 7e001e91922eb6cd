"""How each step of `prune_model` grows with depth, width and calibration tokens: tiny random Llamas.

    python benchmarks/scaling.py                  # the three sweeps below, one torch thread
    python benchmarks/scaling.py --quick          # two points per sweep

Every point is `prune_model` with the CLI's defaults otherwise (self-calibration, the
default selector, cosine compensation, a quarter of the layers removed), in place,
on a random Llama of the given shape (vocabulary 4096, MLP 8/3 x width, heads of 32).
The report's timings are given in seconds and in passes (one plain forward over the
calibration tokens, measured in the same run). Tiny models are dominated by fixed
costs (Python, tracing); docs/scaling.md separates those from the compute that grows
with the model and extrapolates.

Writes `benchmarks/results/scaling-tiny.md` (and `--json`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import common  # noqa: E402

SWEEPS = {
    "depth": [dict(layers=n, hidden=128, windows=8, seq_len=64) for n in (4, 8, 16, 32)],
    "width": [dict(layers=8, hidden=h, windows=8, seq_len=64) for h in (64, 256, 1024)],
    "tokens": [dict(layers=8, hidden=256, windows=w, seq_len=s) for w, s in ((8, 32), (8, 128), (32, 128))],
}
STEPS = ("trace", "calibration_text", "statistics", "pass_unit", "selection", "compensation")


def tiny_llama(layers: int, hidden: int):
    import transformers as T

    config = T.LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                           num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 64),
                           max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return T.LlamaForCausalLM(config).eval()


def measure(point: dict) -> dict:
    from tiny_models import tiny_tokenizer

    import lorp_fx

    model = tiny_llama(point["layers"], point["hidden"])
    config = lorp_fx.PruneConfig(remove=max(1, point["layers"] // 4), calib_samples=point["windows"], seq_len=point["seq_len"],
                                 inplace=True)
    start = time.perf_counter()
    result = lorp_fx.prune_model(model, None, config, tokenizer=tiny_tokenizer(), progress=False)
    report = result.report
    return {**point, "parameters": report["parameters_before"], "wall_s": time.perf_counter() - start,
            "timings": report["timings"], "passes": report["timings_in_passes"], "pass_s": report["pass_unit"]["seconds"]}


def markdown(results: dict, info: dict) -> str:
    lines = ["# How the steps of `prune_model` grow: tiny random Llamas", "",
             "Written by `benchmarks/scaling.py` from one run; do not edit the numbers by hand.", "",
             common.machine_markdown(info), "",
             "Each row: `prune_model` with the defaults (self-calibration, `lorp`, cosine compensation), a quarter of the layers "
             "removed. Seconds per step; `pass` is one plain forward over the calibration tokens, measured in the same run.", ""]
    for sweep, rows in results.items():
        lines += [f"## {sweep}", ""]
        headers = ["layers", "width", "tokens", "parameters", "pass s"] + [f"{s} s" for s in STEPS] + ["total passes"]
        table = []
        for r in rows:
            table.append([r["layers"], r["hidden"], f"{r['windows']} x {r['seq_len']}", f"{r['parameters']:,}", f"{r['pass_s']:.3f}"]
                         + [common.fmt_seconds(r["timings"].get(f"{s}_s", 0.0)) for s in STEPS] + [f"{r['passes'].get('total', 0):.0f}"])
        lines += [common.table(headers, table), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = common.machine()
    results = {}
    for sweep, points in SWEEPS.items():
        results[sweep] = []
        for point in (points[:: len(points) - 1] if args.quick else points):
            results[sweep].append(measure(point))
            r = results[sweep][-1]
            print(f"[scaling] {sweep} {point}: {r['wall_s']:.1f} s, {r['passes'].get('total', 0):.0f} passes", flush=True)
    path = common.write_text(args.out_dir / "scaling-tiny.md", markdown(results, info))
    if args.json:
        common.write_text(args.json, json.dumps({"machine": info, "results": results}, indent=1))
    print(f"[scaling] wrote {path}")


if __name__ == "__main__":
    main()
