"""What a pruning run tells its user: the report dict (report.json), the printed summary, compact names."""

from __future__ import annotations

import re

_TRAILING_INDEX = re.compile(r"^(.*?)(\d+)$")


def compress(indices: list) -> str:
    """[3, 12, 13, 14, 15, 25] -> '3,12..15,25' (runs of three or more), REFERENCE.md's notation."""
    if not indices:
        return ""
    if not all(isinstance(i, int) for i in indices):
        return ",".join(map(str, indices))
    parts, run = [], [indices[0]]
    for i in indices[1:]:
        if i == run[-1] + 1:
            run.append(i)
            continue
        parts.append(run)
        run = [i]
    parts.append(run)
    return ",".join(f"{r[0]}..{r[-1]}" if len(r) >= 3 else ",".join(map(str, r)) for r in parts)


def layer_index(name: str) -> int | str:
    """`model.layers.12` -> 12; a name without a trailing index is returned as it is."""
    tail = name.rpartition(".")[2]
    return int(tail) if tail.isdigit() else name


def span(blocks: list[str]) -> str:
    """A cluster of blocks in one short phrase: 'model.layers.2 .. 24 (23)'."""
    if len(blocks) == 1:
        return blocks[0]
    return f"{blocks[0]} .. {blocks[-1].rsplit('.', 1)[-1]} ({len(blocks)})"


def summary_lines(report: dict, out: str | None = None) -> list[str]:
    """The rows the CLI prints after a prune: method, layers, parameters, removed blocks, ... ."""
    rows = [
        ("method", f"{report['method']} ({report['granularity']})"),
        ("layers", f"{report['layers_before']} -> {report['layers_after']}"),
        ("parameters", f"{report['parameters_before']:,} -> {report['parameters_after']:,} "
                       f"({1 - report['parameters_after'] / report['parameters_before']:.1%} fewer)"),
        ("removed", ", ".join(report["removed"])),
    ]
    if report.get("rls") is not None:
        rows.append(("RLS", f"{report['rls']:.3f}"))
    if report.get("clusters"):
        rows.append(("clusters", "; ".join(span(c) for c in report["clusters"])))
    calibration = report["calibration"]
    rows.append(("calibration", f"{calibration['tokens']:,} tokens, {calibration['source']}"))
    rows.append(("compensation", _compensation_phrase(report.get("compensation") or {"method": "none"})))
    if calibration["source"].startswith("self-generated"):
        # Measured (research/results/calibration-domain-smollm2.md): maps fitted on the model's own text recover
        # much of the loss on that text but little on WikiText-2, and maps fitted on WikiText-2 the reverse.
        rows.append(("hint", "calibrated on the model's own text, so the compensation fits that text; "
                             "pass --calib-file with text like yours"))
    evaluation = report.get("evaluation")
    if evaluation:
        rows.append(("perplexity", f"{evaluation['ppl_before']:.2f} -> {evaluation['ppl_after']:.2f} "
                                   f"({evaluation['tokens']:,} tokens of {evaluation['file']})"))
    if out is not None:
        rows.append(("written to", str(out)))
    width = max(len(name) for name, _ in rows)
    return [f"  {name:<{width}}  {value}" for name, value in rows]


def _compensation_phrase(compensation: dict) -> str:
    if compensation.get("applied") is False:
        loss = compensation["calibration_loss"]
        return (f"none: {compensation['requested']} not applied, it made the calibration loss worse "
                f"({loss['compensated']:.4f} > {loss['uncompensated']:.4f})")
    if compensation.get("gaps"):
        errors = ", ".join(f"{g['error_before']:.3f} -> {g['error_after']:.3f}" for g in compensation["gaps"])
        count = len(compensation["gaps"])
        phrase = f"{compensation['method']}, {count} gap{'' if count == 1 else 's'} folded, relative gap error {errors}"
        loss = compensation.get("calibration_loss") or {}
        if loss.get("held_out"):  # the guard's evidence: the loss on calibration windows the maps were not fitted on
            phrase += f"; held-out calibration loss {loss['uncompensated']:.4f} -> {loss['compensated']:.4f}"
        return phrase
    if compensation.get("skipped"):
        return f"none ({compensation['skipped']})"
    return "none"
