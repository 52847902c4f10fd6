"""Compute scaling (Switch paper Fig. 1): training FLOPs vs reconstruction at fixed k.

Training FLOPs of an SAE = 3 x forward FLOPs/token x training tokens (SPEC §1: a training
step costs about three forward passes). One panel per k shared by at least two groups of
fixed-k architectures (TopK family, Switch, Scale); each point is one SAE.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from matplotlib.ticker import NullFormatter  # noqa: E402

from saepipe.plots.availability import FIXED_K_ARCHS, scaling_ks  # noqa: E402
from saepipe.plots.style import finish, group_styles  # noqa: E402



def training_flops(row: dict) -> float:
    return 3.0 * row["flops_per_token"] * row["training_tokens"]


def plot_scaling(table_parquet: str, out_png: str) -> None:
    table = pq.read_table(table_parquet).to_pylist()
    style = group_styles(r["group"] for r in table)  # same colours as the frontier
    rows = [r for r in table if r["arch"] in FIXED_K_ARCHS]
    ks = scaling_ks(rows)
    if not ks:
        raise ValueError("the scaling figure needs at least two fixed-k groups (e.g. topk and "
                         "switch) sharing a value of k")
    groups = sorted({r["group"] for r in rows})
    fig, axes = plt.subplots(1, len(ks), figsize=(4.6 * len(ks), 4.6), constrained_layout=True,
                             squeeze=False, sharey=True)
    for ax, k in zip(axes[0], ks):
        for g in groups:
            pts = [r for r in rows if r["group"] == g and r["k"] == k]
            for r in pts:
                ax.scatter(training_flops(r), r["l2_per_token"], s=60,
                           label=f"{g} (M={r['width']})", **style[g])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.15)
        ax.set_xlabel("training FLOPs (3 × forward FLOPs/token × tokens, log)")
        ax.set_title(f"k = {k}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("‖x − x̂‖² per token (held-out)")
    finish(fig, axes[0], "Reconstruction vs training compute at fixed k (lower-left is better)", out_png)
