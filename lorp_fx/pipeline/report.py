"""What a pruning run tells its user when it ends: the printed summary and the cost line (report.json is
built by `run.build_report`)."""

from __future__ import annotations

from lorp_fx.core.names import span


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
    for warning in (calibration.get("mismatch") or {}).get("warnings", []):
        rows.append(("warning", warning))
    if calibration["source"].startswith("self-generated"):
        # Measured (research/results/calibration-domain-smollm2.md): maps fitted on the model's own text recover
        # much of the loss on that text but little on WikiText-2, and maps fitted on WikiText-2 the reverse.
        rows.append(("hint", "calibrated on the model's own text, so the compensation fits that text; "
                             "pass --calib-file with text like yours"))
    healing = report.get("healing")
    if healing:
        held = healing["held_out"]
        on_held_out = f"; held-out perplexity {held['ppl_before']:.2f} -> {held['ppl_after']:.2f}" if "ppl_after" in held else ""
        rows.append(("healing", (f"{healing['steps']} steps ({healing['train']}), {healing['tokens']:,} tokens, "
                                 f"{healing['seconds']:.0f} s{on_held_out}")))
    evaluation = report.get("evaluation")
    if evaluation:
        healed = f" -> {evaluation['ppl_healed']:.2f} healed" if "ppl_healed" in evaluation else ""
        rows.append(("perplexity", (f"{evaluation['ppl_before']:.2f} -> {evaluation['ppl_after']:.2f}{healed} "
                                    f"({evaluation['tokens']:,} tokens of {evaluation['file']})")))
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
    if compensation.get("summary"):
        return f"none: {compensation['summary'].removeprefix('no map folded: ')}"
    return "none"


def cost_line(report: dict) -> str:
    """The run's cost in passes (one plain forward over the calibration tokens) and seconds, step by step."""
    passes, unit = report.get("timings_in_passes") or {}, report.get("pass_unit") or {}
    steps = ", ".join(f"{k} {v:.2f}" for k, v in passes.items() if k != "total")
    return f"  cost  {passes.get('total', float('nan')):.2f} passes ({steps}); one pass = {unit.get('seconds', float('nan')):.1f} s"
