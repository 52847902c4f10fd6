"""Pareto frontiers (Switch paper Fig. 3): L0 vs l2_per_token and L0 vs 1 - loss recovered.

Row 1 shows every SAE of the sweep. When the sweep declares matched groups
(`match: {baseline, by}`), one more row per kind of matching shows the baseline group
against the groups FLOP-matched (equal forward FLOPs/token) or width-matched (equal
total latents) to it. A group keeps its colour and marker in every panel.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from saepipe.plots.style import finish, group_styles  # noqa: E402

COLUMNS = [
    ("l2_per_token", "‖x − x̂‖² per token"),
    ("one_minus_lr", "1 − loss recovered (log)"),
]
MATCH_TITLES = {"flops": "FLOP-matched to {base}", "width": "width-matched to {base}"}


def _label(group: str, r: dict) -> str:
    if (r.get("n_experts") or 1) > 1:
        e = r.get("active_experts") or 1
        experts = f"N={r['n_experts']}" + (f", e={e}" if e > 1 else "")
        return f"{group}  ({r['arch']}, {experts}, M={r['width']})"
    return f"{group}  ({r['arch']}, M={r['width']})"


def _panel_rows(groups: dict[str, list[dict]]) -> list[tuple[str, list[str]]]:
    """(title, group names) for each row of panels."""
    panels = [("All SAEs", sorted(groups))]
    for by, title in MATCH_TITLES.items():
        for base in sorted({g[0]["match_baseline"] for g in groups.values()
                            if g[0].get("match_by") == by and g[0].get("match_baseline") in groups}):
            matched = sorted(name for name, g in groups.items()
                             if g[0].get("match_by") == by and g[0].get("match_baseline") == base)
            panels.append((title.format(base=base), [base, *matched]))
    return panels


def plot_frontier(table_parquet: str, out_png: str) -> None:
    rows = pq.read_table(table_parquet).to_pylist()
    groups: dict[str, list[dict]] = {}
    for r in rows:
        r["one_minus_lr"] = max(1 - r["loss_recovered"], 1e-6)
        groups.setdefault(r["group"], []).append(r)
    style = group_styles(groups)
    panel_rows = _panel_rows(groups)
    fig, axes = plt.subplots(len(panel_rows), 2, figsize=(12, 1.0 + 4.0 * len(panel_rows)),
                             constrained_layout=True, squeeze=False)
    for (title, names), ax_row in zip(panel_rows, axes):
        for ax, (col, ylabel) in zip(ax_row, COLUMNS):
            for name in names:
                grows = sorted(groups[name], key=lambda r: r["l0"])
                ax.plot([r["l0"] for r in grows], [r[col] for r in grows], label=_label(name, grows[0]),
                        linewidth=1.8, markersize=6, **style[name])
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.set_xlabel("L0 (mean active latents per token, log scale)")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            if col == "one_minus_lr":
                ax.set_yscale("log")
    finish(fig, axes[:, 0], "Sparsity–reconstruction frontier (held-out tokens; lower is better)", out_png)
