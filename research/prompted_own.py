"""Does the model's own text from varied openings make the default's maps carry further? (issue 24, exploration)

The default calibration (no --calib-file) fits the maps on 24 windows of the shipped corpus and 8
windows the model writes itself from its start token. On SmolLM2-135M at 9 of 30 those maps help
WikiText-2, documentation and licences but hurt Python code by 14% (benchmarks/results/domains-smollm2.md).
This compares, for the default's layers at 9 of 30 (4..6, 13..18), maps fitted on

* `default`: corpus 24 + own 8 (from the start token), what ships;
* `openings`: corpus 24 + own 8, each own window opening with one of `OPENINGS` (text of other kinds:
  code, markup, a table, a letter, a list, a question, another language) and then sampled;
* `both`: corpus 24 + own 8 + own-with-openings 8.

Each with the shipped `Compensator(reject_unhelpful=True, sources=...)`, against no maps, on the
texts of benchmarks/domains.py (none of them is calibration text).

    python research/prompted_own.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import research.common as C  # noqa: E402
from domains import kind_texts, spread_windows  # noqa: E402
from lorp_fx.arch.surgery import remove_layers  # noqa: E402
from lorp_fx.calibration.sampling import opening_ids, self_calibration  # noqa: E402
from lorp_fx.compensation.fit import Compensator  # noqa: E402
from lorp_fx.io.corpus import corpus_windows  # noqa: E402
from lorp_fx.judge.perplexity import perplexity  # noqa: E402
from lorp_fx.pipeline.calibrate import interleave  # noqa: E402

LAYERS = [4, 5, 6, 13, 14, 15, 16, 17, 18]



def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> None:
    C.threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    model, tok = C.model()
    corpus = corpus_windows(tok, 24, 256)
    own = self_calibration(model, tok, 8, 256, seed=0, progress=False)
    opened = self_calibration(model, tok, 8, 256, seed=0, progress=False,
                              openings=list(opening_ids(tok).values()))
    for row in opened:
        log("opened: " + repr(tok.decode(row[:40])))
    fits = {"default": {"corpus": corpus, "own": own}, "openings": {"corpus": corpus, "own": opened},
            "both": {"corpus": corpus, "own": own, "opened": opened}}
    texts = kind_texts()
    evals = {"wikitext-2 test": C.evaluation("test"),
             "own held-out": self_calibration(model, tok, 64, 256, seed=0, progress=False, windows=range(32, 64))}
    evals.update({k: spread_windows(tok, t, 8, 512) for k, t in texts.items()})
    names = C.layer_names(LAYERS)
    rows = {}
    pruned = remove_layers(model, names)
    rows["none"] = {k: perplexity(pruned.model, w, batch_size=4, progress=False) for k, w in evals.items()}
    log(f"none {rows['none']}")
    for label, parts in fits.items():
        windows, sources = interleave(parts)
        compensator = Compensator(model, names, C.batches(windows, 4), "cosine", ridge="auto", reject_unhelpful=True,
                                  sources=sources)
        pruned = remove_layers(model, names)
        applied = compensator.apply(pruned)
        rows[label] = {k: perplexity(pruned.model, w, batch_size=4, progress=False) for k, w in evals.items()}
        rows[label]["gaps"] = [f.fold_into for f in applied]
        log(f"{label} {rows[label]}")
    out = C.ROOT / "research" / "results" / "prompted-own-smollm2.json"
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
