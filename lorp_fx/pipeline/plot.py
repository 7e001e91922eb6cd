"""The picture people look at: the similarity heatmap with its clusters and the removed blocks."""

from __future__ import annotations

import io

import numpy as np

from lorp_fx.core.errors import LoRPError
from lorp_fx.core.plan import PruningPlan


def similarity_heatmap(plan: PruningPlan, title: str | None = None) -> bytes:
    """PNG bytes: S over the residual points, cluster boundaries, removed blocks marked.

    Row/column i is the input of block i (the last one is the output of the last
    block). Removed blocks are outlined in red on the diagonal and listed in red on
    the axis; cluster boundaries (when the method clusters) are white lines.
    """
    try:  # matplotlib is an optional extra, and importing pyplot costs seconds: only where a picture is drawn
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LoRPError("the heatmap needs matplotlib: pip install 'lorp-fx[plot]'") from None
    stats = plan.statistics
    if stats is None:
        raise LoRPError("this plan carries no statistics to plot")
    s = np.asarray(stats.similarity)
    n = s.shape[0]
    removed = {stats.blocks.index(name) for name in plan.remove if name in stats.blocks}
    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=110)
    image = ax.imshow(s, cmap="viridis", vmin=min(0.0, float(s.min())), vmax=1.0)
    fig.colorbar(image, ax=ax, label="mean per-token cosine similarity")
    for cluster in plan.clusters or []:
        members = sorted(stats.blocks.index(b) for b in cluster if b in stats.blocks)
        if members:
            start = stats.block_points[members[0]][0] - 0.5
            stop = stats.block_points[members[-1]][0] + 0.5
            ax.add_patch(plt.Rectangle((start, start), stop - start, stop - start, fill=False, ec="white", lw=1.5))
    for block in removed:
        point = stats.block_points[block][0]
        ax.add_patch(plt.Rectangle((point - 0.5, point - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ticks = list(range(n))
    labels = [_short(p) for p in stats.points]
    step = max(1, n // 32)
    ax.set_xticks(ticks[::step], labels[::step], rotation=90, fontsize=6)
    ax.set_yticks(ticks[::step], labels[::step], fontsize=6)
    for label, tick in zip(ax.get_yticklabels(), ticks[::step]):
        if any(stats.block_points[b][0] == tick for b in removed):
            label.set_color("red")
    summary = f"{plan.method}: remove {len(plan.remove)} of {stats.n_blocks}"
    if plan.rls is not None:
        summary += f"   RLS {plan.rls:.3f}"
    ax.set_title(title or summary, fontsize=10)
    ax.set_xlabel("residual point (input of block; last: output)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _short(point: str) -> str:
    """'model.layers.12:in' -> '12', 'model.layers.29:out' -> '29 out'."""
    name, _, side = point.rpartition(":")
    tail = name.split(".")[-1]
    label = tail if tail.isdigit() else name.rsplit(".", 2)[-2] + "." + tail if "." in name else name
    return label + (" out" if side == "out" else "")
