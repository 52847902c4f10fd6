"""Compute scaling (Switch paper Fig. 1): training FLOPs vs reconstruction at fixed k.

Training FLOPs of an SAE = 3 x forward FLOPs/token x training tokens (docs/reference.md §1: a training
step costs about three forward passes; the paper's convention, which leaves out the
optimizer -- the frontier's equal-training-cost panel uses the table's
``train_flops_per_token``, optimizer included). One panel per k shared by at least two
groups of fixed-k architectures (TopK family, Switch, Scale). Each marker is one sweep
point: the MEAN over its seeds (rows sharing ``point_id``; `saepipe.plots.style.mean_over_seeds`)
with a 95% Student-t CI error bar on l2_per_token (and on training FLOPs if they differ
between seeds); a single-seed point has no bar, and the subtitle states n. The points of a
group that differ only in active experts (a Scale e sweep) are labelled e=...
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter

from saepipe.plots.availability import row_trait, scaling_ks
from saepipe.plots.rows import read_table_rows
from saepipe.plots.style import decorate, draw_series, group_styles, mean_over_seeds, n_suffix, save, seeds_note

TITLE = "Reconstruction vs training compute at fixed k (lower-left is better)"
METRICS = ("training_flops", "l2_per_token")


def training_flops(row: dict) -> float:
    """3 x forward FLOPs/token x training tokens (the Switch paper's compute axis)."""
    return 3.0 * row["flops_per_token"] * row["training_tokens"]


def scaling_points(rows: list[dict]) -> list[dict]:
    """The plotted points: the fixed-k SAEs' rows folded over seeds (one per ``point_id``,
    ``sae_id`` when absent), ``training_flops`` and ``l2_per_token`` as `Estimate` s."""
    fixed = [{**r, "training_flops": training_flops(r)} for r in rows if row_trait(r, "l0_fixed")]
    return [p for p in mean_over_seeds(fixed, METRICS) if p["l2_per_token"] is not None]


def scaling_figure(rows: list[dict]):
    """The figure for table rows (seeds as separate rows), legend and titles included, not
    saved. Raises ValueError when fewer than two fixed-k groups share a k."""
    style = group_styles(r["group"] for r in rows)  # same colours as the frontier
    points = scaling_points(rows)
    ks = scaling_ks(points)
    if not ks:
        raise ValueError(
            "the scaling figure needs at least two fixed-k groups (e.g. topk and switch) sharing a value of k"
        )
    all_ns = [p["n_seeds"] for p in points if p["k"] in ks]
    fig, axes = plt.subplots(
        1, len(ks), figsize=(4.6 * len(ks), 5.0), constrained_layout=True, squeeze=False, sharey=True
    )
    drawn: list[int] = []
    for ax, k in zip(axes[0], ks):
        for g in sorted({p["group"] for p in points}):
            pts = sorted((p for p in points if p["group"] == g and p["k"] == k), key=lambda p: p["training_flops"].mean)
            e_sweep = len({p.get("active_experts") for p in pts}) > 1  # Scale: label e
            for p in pts:
                label = f"{g} (M={p['width']}{n_suffix([p['n_seeds']], all_ns)})"
                drawn += draw_series(
                    ax,
                    [p["training_flops"]],
                    [p["l2_per_token"]],
                    label=label,
                    style={**style[g], "markersize": 8},
                    connect=False,
                )
                if e_sweep:
                    ax.annotate(
                        f"e={p.get('active_experts')}",
                        (p["training_flops"].mean, p["l2_per_token"].mean),
                        textcoords="offset points",
                        xytext=(7, -3),
                        fontsize=7,
                        color=style[g].get("color"),
                    )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.15)
        ax.set_xlabel("training FLOPs (3 × forward FLOPs/token × tokens, log)")
        ax.set_title(f"k = {k}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("‖x − x̂‖² per token (held-out)")
    decorate(fig, axes[0], TITLE, seeds_note(drawn))
    return fig


def plot_scaling(table_parquet: str, out_png: str) -> None:
    """results/table.parquet -> the scaling PNG (written atomically)."""
    save(scaling_figure(read_table_rows(table_parquet)), out_png)
