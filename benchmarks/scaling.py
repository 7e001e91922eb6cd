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
# Published shapes (config.json of meta-llama/Llama-3.1-8B and -70B), traced as meta-device copies: no weights.
LARGE = {
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
    "Llama-3.1-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256),
}


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


def trace_large(name: str, shape: dict) -> dict:
    """Tracing and block discovery of a meta-device copy of a large model: what `trace` costs there (no weights,
    so nothing is computed; the real model's trace adds one forward over 2 windows)."""
    import transformers as T

    from lorp_fx.graph.blocks import find_blocks
    from lorp_fx.graph.trace import skeleton_graph

    config = T.LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        model = T.LlamaForCausalLM(config)
    example = {"input_ids": torch.ones(2, 256, dtype=torch.long), "attention_mask": torch.ones(2, 256, dtype=torch.long),
               "use_cache": False}
    start = time.perf_counter()
    graph = skeleton_graph(model, example)
    traced = time.perf_counter() - start
    start = time.perf_counter()
    blocks = find_blocks(graph, "layer")
    found = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    return {"model": name, "layers": shape["num_hidden_layers"], "parameters": parameters, "nodes": len(graph.graph.nodes),
            "trace_s": traced, "find_blocks_s": found, "blocks": len(blocks)}


def markdown(results: dict, info: dict) -> str:
    lines = ["# How the steps of `prune_model` grow: tiny random Llamas", "",
             "Written by `benchmarks/scaling.py` from one run; do not edit the numbers by hand.", "",
             common.machine_markdown(info), "",
             "Each row: `prune_model` with the defaults (self-calibration, `lorp`, cosine compensation), a quarter of the layers "
             "removed. Seconds per step; `pass` is one plain forward over the calibration tokens, measured in the same run.", ""]
    for sweep, rows in results.items():
        if sweep == "large":
            continue
        lines += [f"## {sweep}", ""]
        headers = ["layers", "width", "tokens", "parameters", "pass s"] + [f"{s} s" for s in STEPS] + ["total passes"]
        table = []
        for r in rows:
            table.append([r["layers"], r["hidden"], f"{r['windows']} x {r['seq_len']}", f"{r['parameters']:,}", f"{r['pass_s']:.3f}"]
                         + [common.fmt_seconds(r["timings"].get(f"{s}_s", 0.0)) for s in STEPS] + [f"{r['passes'].get('total', 0):.0f}"])
        lines += [common.table(headers, table), ""]
    if results.get("large"):
        lines += ["## Tracing large models (meta-device copies)", "",
                  "`torch.export` of a weightless copy with the published shape, on 2 x 256 tokens, and block discovery: "
                  "the fixed cost the `trace` step has on a real model of that shape (which adds one forward over 2 windows).", ""]
        lines += [common.table(["model", "layers", "parameters", "graph nodes", "trace s", "find_blocks s"],
                               [[r["model"], r["layers"], f"{r['parameters'] / 1e9:.2f} B", f"{r['nodes']:,}", f"{r['trace_s']:.1f}",
                                 f"{r['find_blocks_s']:.2f}"] for r in results["large"]]), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-sweeps", action="store_true", help="only trace the large models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = common.machine()
    results = {}
    if not args.skip_sweeps:
        run_sweeps(results, args)
    results["large"] = [trace_large(name, shape) for name, shape in LARGE.items()]
    for r in results["large"]:
        print(f"[scaling] traced {r['model']}: {r['trace_s']:.1f} s, {r['nodes']} nodes", flush=True)
    path = common.write_text(args.out_dir / "scaling-tiny.md", markdown(results, info))
    if args.json:
        common.write_text(args.json, json.dumps({"machine": info, "results": results}, indent=1))
    print(f"[scaling] wrote {path}")


def run_sweeps(results: dict, args) -> None:
    for sweep, points in SWEEPS.items():
        results[sweep] = []
        for point in (points[:: len(points) - 1] if args.quick else points):
            results[sweep].append(measure(point))
            r = results[sweep][-1]
            print(f"[scaling] {sweep} {point}: {r['wall_s']:.1f} s, {r['passes'].get('total', 0):.0f} passes", flush=True)


if __name__ == "__main__":
    main()
