"""The sparsity-reconstruction frontier: L0 vs l2_per_token and L0 vs 1 - loss recovered."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from saepipe.io import atomic_path  # noqa: E402

PANELS = [
    ("l2_per_token", "reconstruction error  ‖x − x̂‖² per token", "Reconstruction"),
    ("one_minus_lr", "1 − loss recovered  (log scale)", "Downstream loss"),
]


def _label(group: str, rows: list[dict]) -> str:
    r = rows[0]
    if (r.get("n_experts") or 1) > 1:
        return f"{group}  ({r['arch']}, N={r['n_experts']}, M={r['width']})"
    return f"{group}  ({r['arch']}, M={r['width']})"


def plot_frontier(table_parquet: str, out_png: str) -> None:
    rows = pq.read_table(table_parquet).to_pylist()
    for r in rows:
        r["one_minus_lr"] = max(1 - r["loss_recovered"], 1e-6)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), constrained_layout=True)
    markers = "osD^v<>ph*"
    for ax, (col, ylabel, title) in zip(axes, PANELS):
        for i, (group, grows) in enumerate(sorted(groups.items())):
            grows = sorted(grows, key=lambda r: r["l0"])
            ax.plot([r["l0"] for r in grows], [r[col] for r in grows], marker=markers[i % len(markers)],
                    label=_label(group, grows), linewidth=1.8, markersize=6)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("L0  (mean active latents per token, log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if col == "one_minus_lr":
            ax.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle("Sparsity–reconstruction frontier (held-out tokens; lower is better)", fontsize=12)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)
