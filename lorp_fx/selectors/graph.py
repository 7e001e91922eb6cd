"""Graph view of the statistics: blocks (or residual points) linked by their similarity."""

from __future__ import annotations

import networkx as nx

from ._common import SelectorError
from ..stats import LayerStatistics


def similarity_graph(
    stats: LayerStatistics, threshold: float | None = None, *, over: str = "blocks"
) -> nx.Graph:
    """Weighted graph of blocks (their inputs' similarity) or of residual points.

    Node attributes: `index` (depth), and for blocks `kind` and `removable`; edge
    attribute `weight` = mean token cosine. With `threshold`, only edges with
    weight >= threshold are kept.
    """
    if over == "blocks":
        names, S = stats.blocks, stats.input_similarity()
    elif over == "points":
        names, S = stats.points, stats.similarity
    else:
        raise SelectorError(f"similarity_graph(over={over!r}): use over='blocks' or over='points'")
    graph = nx.Graph()
    for i, name in enumerate(names):
        attrs = {"index": i}
        if over == "blocks":
            attrs.update(kind=stats.block_kinds[i], removable=bool(stats.removable[i]))
        graph.add_node(name, **attrs)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if threshold is None or S[i, j] >= threshold:
                graph.add_edge(names[i], names[j], weight=float(S[i, j]))
    return graph


def similarity_regions(stats: LayerStatistics, threshold: float) -> list[list[str]]:
    """Blocks linked by input similarity >= threshold: connected components, in depth order."""
    graph = similarity_graph(stats, threshold)
    index = nx.get_node_attributes(graph, "index")
    regions = [sorted(c, key=index.__getitem__) for c in nx.connected_components(graph)]
    return sorted(regions, key=lambda r: index[r[0]])
