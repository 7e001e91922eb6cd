"""Do compensation maps carry over between calibration sources? (issue 14, self-generated text)

At 9 of 30 layers, for the set the default chose with WikiText-2 calibration and the set it chose
with self-generated calibration (`rows-wiki-32.json`, `rows-self-32.json`, compensated objective),
fit cosine maps on each source's 32 x 256 windows (as shipped: every window) and measure
perplexity on WikiText-2 (valid-held, test) and on self-generated text the maps never saw
(windows 32..63 of the seed-0 sample, 32 x 256). Writes research/results/calibration-domain-smollm2.md.

    python research/calibration_domain.py
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import research.common as C  # noqa: E402
from research.report import span  # noqa: E402

RESULTS = C.ROOT / "research" / "results"
EVALS = ("valid-held", "test", "self-held")


def main():
    C.threads(1)
    sets = {f"chosen on {source}": json.loads((RESULTS / f"rows-{source}-32.json").read_text())["9:cosine"]["remove"]
            for source in ("wiki", "self")}
    m, _ = C.model()
    from lorp_fx.judge.perplexity import perplexity as ppl

    dense = ppl(m, C.evaluation("self-held"), batch_size=4, progress=False)
    rows = []
    for label, indices in sets.items():
        for maps in (None, "wiki", "self"):
            tag = f"domain-{maps or 'none'}"
            known = all(C.Memo("ppl").get(f"{w}:{tag}:{C.set_key(indices)}") is not None for w in EVALS)
            fits = C.evaluator(maps, 32, "cosine").final_fits(C.layer_names(indices)) if maps and not known else None
            row = {"set": label, "layers": span(indices), "maps": maps or "none",
                   **{w: C.perplexity(indices, fits, w, tag) for w in EVALS}}
            C.emit(row, rows)
    lines = [
        "# Compensation maps across calibration sources (SmolLM2-135M, 9 of 30 layers)",
        "",
        "Written by `research/calibration_domain.py`; do not edit the numbers by hand. Maps: cosine, fitted on all",
        "32 x 256 windows of the source named (WikiText-2 valid.txt from token 0, or self-generated with seed 0).",
        "valid-held and test: WikiText-2 (see default-selector-smollm2.md); self-held: self-generated windows 32..63",
        f"of the seed-0 sample (32 x 256), which no map was fitted on. Dense model on self-held: {dense:.2f}.",
        "",
        "| set | layers | maps fitted on | valid-held | test | self-held |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['set']} | {r['layers']} | {r['maps']} | {r['valid-held']:.2f} | {r['test']:.2f} | {r['self-held']:.2f} |"
              for r in rows]
    (RESULTS / "calibration-domain-smollm2.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
