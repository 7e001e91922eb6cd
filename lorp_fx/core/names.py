"""Block names in short: compact index lists, layer indices, cluster spans (reports, plots, GGUF)."""

from __future__ import annotations


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
