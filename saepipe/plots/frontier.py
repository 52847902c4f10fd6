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


def _values(grows: list[dict], key: str, default=1) -> str:
    """The group's distinct values of `key`, "8192/2048" when its points differ in it."""
    return "/".join(str(v) for v in dict.fromkeys((r.get(key) or default) for r in grows))


def _label(group: str, grows: list[dict]) -> str:
    width = f"M={_values(grows, 'width')}"
    if (grows[0].get("n_experts") or 1) > 1:
        e = _values(grows, "active_experts")
        experts = f"N={grows[0]['n_experts']}" + (f", e={e}" if e != "1" else "")
        return f"{group}  ({grows[0]['arch']}, {experts}, {width})"
    return f"{group}  ({grows[0]['arch']}, {width})"


def _plot_group(ax, col: str, name: str, grows: list[dict], style: dict) -> None:
    """A line through the group's k values; a group whose points share k but differ in the
    number of active experts (a Scale e sweep) gets unconnected markers labelled e=..."""
    xs, ys = [r["l0"] for r in grows], [r[col] for r in grows]
    by_e = len({r.get("k") for r in grows}) == 1 and len({r.get("active_experts") for r in grows}) > 1
    ax.plot(xs, ys, label=_label(name, grows), linewidth=1.8, markersize=6,
            **{**style, **({"linestyle": "none"} if by_e else {})})
    if by_e:
        for r, x, y in zip(grows, xs, ys):
            ax.annotate(f"e={r.get('active_experts')}", (x, y), textcoords="offset points", xytext=(6, -3),
                        fontsize=7, color=style.get("color"))


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
                _plot_group(ax, col, name, sorted(groups[name], key=lambda r: r["l0"]), style[name])
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.set_xlabel("L0 (mean active latents per token, log scale)")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            if col == "one_minus_lr":
                ax.set_yscale("log")
    finish(fig, axes[:, 0], "Sparsity–reconstruction frontier (held-out tokens; lower is better)", out_png)
