"""healing.png, the companion of similarity.png: the distillation loss against the step, and the held-out
perplexity before and after."""

from __future__ import annotations

import io

from lorp_fx.core.errors import LoRPError


def healing_curve(healing: dict) -> bytes:
    """PNG bytes of report.json's "healing": KL (and the total loss where a hidden-state term is on) per step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LoRPError("the healing curve needs matplotlib: pip install 'lorp-fx[plot]'") from None
    curve = healing.get("loss_curve") or []
    steps = [point[0] for point in curve]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    ax.plot(steps, [point[2] for point in curve], label="KL(dense || pruned), nats per token")
    if healing.get("config", {}).get("hidden_weight"):
        ax.plot(steps, [point[1] for point in curve], label="total loss (KL + hidden-state term)", alpha=0.7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over each logged stretch of steps)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    held = healing.get("held_out") or {}
    title = f"healing: {healing.get('steps')} steps, train {healing.get('train')}, {healing.get('tokens', 0):,} tokens"
    if held.get("ppl_before") is not None:
        title += (f"\nheld-out perplexity {held['ppl_before']:.2f} -> {held['ppl_after']:.2f} "
                  f"(dense {held['ppl_dense']:.2f}, {held['tokens']:,} tokens)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
