"""Pruned GGUF files of SmolLM2 (issue 16): their size, and what requantizing compensated projections costs.

    python benchmarks/gguf_requant.py                 # shortgpt, 6 and 9 layers
    python benchmarks/gguf_requant.py --budgets 6

Protocol (../shared/REFERENCE.md): calibration = the first 32 x 256 tokens of WikiText-2
valid.txt (statistics for the selector and the compensation fit), perplexity on the
first 40 x 512 tokens of test.txt, fp32 on CPU, 1 torch thread. For each budget,
shortgpt chooses the layers; then

* float surgery: `remove_layers` on the model dequantized from the GGUF file;
* GGUF: `write_pruned_gguf` without `replaced`, re-read by transformers (no tensor
  requantized: must equal float surgery);
* float compensated: `compensate(model, plan, batches, "cosine")`;
* GGUF compensated: the changed projections (`changed_parameters`) requantized into
  the pruned GGUF (`replaced`) in their original type, re-read by transformers;
* GGUF compensated, Q8_0: the same with `requantize_as="Q8_0"` (a few more bytes).

The results file is written from this run's own numbers (do not edit by hand).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from lorp_fx import select  # noqa: E402
from lorp_fx.arch.surgery import remove_layers  # noqa: E402
from lorp_fx.calibration.graph_observer import collect_statistics  # noqa: E402
from lorp_fx.compensation.fit import compensate  # noqa: E402
from lorp_fx.io.gguf.export import read_gguf, write_pruned_gguf  # noqa: E402
from lorp_fx.io.gguf.requant import changed_parameters  # noqa: E402
from lorp_fx.io.models import load_model, smollm2_gguf_path  # noqa: E402
from lorp_fx.io.text import text_windows  # noqa: E402
from lorp_fx.judge.perplexity import perplexity  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=None, help="a GGUF file (default: the embedded SmolLM2)")
    common.add_text_arguments(p)
    p.add_argument("--budgets", default="6,9")
    p.add_argument("--selector", default="shortgpt")
    p.add_argument("--method", default="cosine")
    p.add_argument("--out", type=Path, default=common.RESULTS / "gguf-smollm2.md")
    args = p.parse_args(argv)
    if args.calib_file is None or args.eval_file is None:
        p.error("--calib-file and --eval-file are required: ../shared/data/wikitext-2 is absent")
    args.budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    return args


def log(message: str) -> None:
    print(f"[gguf {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    info = common.machine()
    source = args.source or smollm2_gguf_path()
    model, tokenizer = load_model(source)
    calib = text_windows(tokenizer, [args.calib_file], args.calib_samples, args.calib_len)
    evaluation = text_windows(tokenizer, [args.eval_file], args.eval_samples, args.eval_len)
    calib_batches = list(calib.split(args.batch_size))

    def ppl(m) -> float:
        return perplexity(m, evaluation, batch_size=args.batch_size, progress=False)

    log("dense")
    results = {"dense": ppl(model), "source_name": Path(source).name, "source_size": Path(source).stat().st_size, "rows": []}
    stats, _ = collect_statistics(model, [{"input_ids": w} for w in calib_batches], progress=False)
    src = read_gguf(source)
    with tempfile.TemporaryDirectory(prefix="lorp-gguf-") as tmp:
        for budget in args.budgets:
            plan = select(stats, budget, method=args.selector)
            removed = sorted(int(name.rpartition(".")[2]) for name in plan.remove)
            log(f"{args.selector} {budget}: layers {removed}")
            row = {"budget": budget, "removed": removed}
            surgery = remove_layers(model, plan.remove).model
            row["float_surgery"] = ppl(surgery)
            plain_path = Path(tmp) / f"pruned-{budget}.gguf"
            plain_report = write_pruned_gguf(src, plain_path, removed, progress=False)
            row["gguf_plain"] = ppl(load_model(plain_path)[0])
            row["size_plain"] = plain_report["size_bytes"]
            compensated = compensate(model, plan, calib_batches, args.method).model
            row["float_comp"] = ppl(compensated)
            replaced = changed_parameters(surgery, compensated)
            comp_path = Path(tmp) / f"compensated-{budget}.gguf"
            comp_report = write_pruned_gguf(src, comp_path, removed, replaced, progress=False)
            row["gguf_comp"] = ppl(load_model(comp_path)[0])
            row["size_comp"] = comp_report["size_bytes"]
            row["requantized"] = comp_report["requantized"]
            q8_path = Path(tmp) / f"compensated-q8-{budget}.gguf"
            q8_report = write_pruned_gguf(src, q8_path, removed, replaced, progress=False, requantize_as="Q8_0")
            row["gguf_comp_q8"] = ppl(load_model(q8_path)[0])
            row["size_comp_q8"] = q8_report["size_bytes"]
            row["notes"] = comp_report["notes"]
            row["expected_size"] = _expected_size(src, removed)
            results["rows"].append(row)
            log(f"{budget}: {row}")
            common.write_text(args.out, render(results, args, info))
    common.write_text(args.out, render(results, args, info))
    log(f"wrote {args.out}")


def _expected_size(src, removed: list[int]) -> int:
    """Input size minus the removed layers' tensor bytes (the header shrinks by a few KB more)."""
    layers = src.layer_tensors()
    return src.size - sum(t.n_bytes for i in removed for t in layers[i])


def render(results: dict, args, info: dict) -> str:
    rows = []
    for row in results["rows"]:
        rows.append([
            row["budget"], ",".join(map(str, row["removed"])), common.fmt_ppl(row["float_surgery"]),
            common.fmt_ppl(row["gguf_plain"]), common.fmt_ppl(row["float_comp"]), common.fmt_ppl(row["gguf_comp"]),
            f"{100 * (row['gguf_comp'] / row['float_comp'] - 1):+.2f}%", common.fmt_ppl(row["gguf_comp_q8"]),
            f"{100 * (row['gguf_comp_q8'] / row['float_comp'] - 1):+.2f}%",
        ])
    sizes = [[
        row["budget"], f"{results['source_size']:,}", f"{row['size_plain']:,}", f"{row['expected_size']:,}",
        f"{row['size_comp']:,}", f"{row['size_comp_q8']:,}", ", ".join(sorted({r["type"] for r in row["requantized"]})),
        len(row["requantized"]),
    ] for row in results["rows"]]
    notes = sorted({note for row in results["rows"] for note in row["notes"]})
    lines = [
        f"# Pruned GGUF files of `{results['source_name']}`: size, and the cost of requantizing compensation",
        "",
        "Written by `benchmarks/gguf_requant.py` from its own run (do not edit by hand).",
        "",
        common.machine_markdown(info),
        f"- protocol: {args.selector} on statistics of the first {args.calib_samples} x {args.calib_len} tokens of "
        f"`{args.calib_file.name}`; compensation `{args.method}` fitted on the same windows; perplexity on the first "
        f"{args.eval_samples} x {args.eval_len} tokens of `{args.eval_file.name}` (WikiText-2), fp32, every GGUF "
        "re-read by transformers (dequantized)",
        "",
        f"Dense: **{common.fmt_ppl(results['dense'])}**.",
        "",
        "## Perplexity",
        "",
        common.table(
            ["removed", "layers", "float surgery", "GGUF (no requant)", "float compensated",
             "GGUF compensated (original types)", "cost", "GGUF compensated (Q8_0)", "cost"], rows),
        "",
        "## File sizes (bytes)",
        "",
        common.table(["removed", "input", "pruned GGUF", "input - removed layers' tensors", "compensated GGUF",
                      "compensated GGUF (Q8_0)", "requantized types", "requantized tensors"], sizes),
        "",
    ]
    if notes:
        lines += ["Writer notes:", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
