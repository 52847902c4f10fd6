"""Pareto frontiers (Switch paper Fig. 3): L0 vs l2_per_token and L0 vs 1 - loss recovered,
and the same reconstruction error at equal training cost.

Every marker is one sweep point: the MEAN over its seeds (table rows sharing ``point_id``),
with 95% Student-t confidence intervals as error bars (`saepipe.plots.style.mean_over_seeds`,
`saepipe.stats.mean_ci`): vertical for the plotted metric, horizontal for L0 when L0 varies
between seeds (L1-penalised SAEs; a TopK SAE's L0 is k for every seed). A single-seed point
has no bar; the subtitle states n.

Rows of panels:

* "All SAEs": every group.
* One row per matched comparison the sweep declares (`match: {baseline, by}`): the baseline
  group against the groups FLOP-matched (equal forward FLOPs/token), training-FLOP-matched
  or width-matched (equal total latents) to it.
* "Equal training cost", when the table has ``train_wall_s_per_token`` and/or
  ``train_flops_per_token``: l2_per_token against the measured training wall-clock per
  token and against training FLOPs per token (forward + backward + optimizer), one series
  per group through its k values, so SAEs are compared at what they cost to train rather
  than at equal forward FLOPs (an MoE SAE's optimizer touches all its experts every step).

A group keeps its colour and marker in every panel. A group whose points share k but differ
in the number of active experts (a Scale e sweep) is drawn as unconnected markers labelled
"e=...".
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyarrow.parquet as pq
from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation, ScalarFormatter

from saepipe.plots.style import decorate, draw_series, group_styles, mean_over_seeds, n_suffix, save, seeds_note
from saepipe.stats import finite

TITLE = "Sparsity–reconstruction frontier (held-out tokens; lower is better)"
L0_LABEL = "L0 (mean active latents per token, log scale)"
L2_LABEL = "‖x − x̂‖² per token (held-out)"
COLUMNS = [
    ("l2_per_token", L2_LABEL),
    ("one_minus_lr", "1 − loss recovered (held-out, log)"),
]
# (column, x-axis label, panel title) of the equal-training-cost row
COST_COLUMNS = [
    (
        "train_wall_s_per_token",
        "measured training wall-clock per token (s, log scale)",
        "Equal training cost (measured): ‖x − x̂‖² vs training s/token",
    ),
    (
        "train_flops_per_token",
        "training FLOPs per token (forward + backward + optimizer, log scale)",
        "Equal training cost (FLOPs): ‖x − x̂‖² vs training FLOPs/token",
    ),
]
METRICS = ("l0", "l2_per_token", "one_minus_lr", "train_wall_s_per_token", "train_flops_per_token")
MATCH_TITLES = {
    "flops": "FLOP-matched to {base}",
    "train_flops": "training-FLOP-matched to {base}",
    "width": "width-matched to {base}",
}
ONE_MINUS_LR_FLOOR = 1e-6  # keeps a perfect (or better than clean) SAE on the log axis
_SCI = LogFormatterSciNotation(labelOnlyBase=False)


@FuncFormatter
def _minor_2_5(x: float, pos=None) -> str:
    """Minor log-axis tick labels at 2x and 5x a power of ten only (all of 2..9 collide on a
    panel spanning about a decade)."""
    if x <= 0:
        return ""
    mantissa = x / 10 ** math.floor(math.log10(x) + 1e-9)
    return _SCI(x) if min(abs(mantissa - 2), abs(mantissa - 5)) < 1e-6 else ""


def frontier_points(rows: list[dict]) -> list[dict]:
    """The plotted points: one per sweep point (``point_id``; ``sae_id`` when absent), each
    metric of `METRICS` an `Estimate` (mean, 95% Student-t CI, n) over the point's seeds, or
    None when the table lacks it. ``one_minus_lr`` = max(1 - loss_recovered, 1e-6) per seed,
    then averaged. Config columns (group, arch, k, width, ...) are the seeds' shared values."""
    derived = []
    for r in rows:
        lr = finite(r.get("loss_recovered"))
        derived.append({**r, "one_minus_lr": None if lr is None else max(1 - lr, ONE_MINUS_LR_FLOOR)})
    return mean_over_seeds(derived, METRICS)


def _values(pts: list[dict], key: str, default=1) -> str:
    """The group's distinct values of `key`, "8192/2048" when its points differ in it."""
    return "/".join(str(v) for v in dict.fromkeys((p.get(key) or default) for p in pts))


def _label(group: str, pts: list[dict]) -> str:
    width = f"M={_values(pts, 'width')}"
    if (pts[0].get("n_experts") or 1) > 1:
        e = _values(pts, "active_experts")
        experts = f"N={pts[0]['n_experts']}" + (f", e={e}" if e != "1" else "")
        return f"{group}  ({pts[0]['arch']}, {experts}, {width})"
    return f"{group}  ({pts[0]['arch']}, {width})"


def _is_e_sweep(pts: list[dict]) -> bool:
    """The group's points share k but differ in active experts (a Scale e sweep)."""
    return len({p.get("k") for p in pts}) == 1 and len({p.get("active_experts") for p in pts}) > 1


def _plot_group(ax, xcol: str, ycol: str, pts: list[dict], label: str, style: dict, tag_k: bool = False) -> list[int]:
    """One group's points with data for both columns: a line in the order given, or
    unconnected markers labelled e=... for a Scale e sweep; `tag_k` labels the others k=...
    (on a cost axis the k of a point is not readable from x). Returns the drawn n's."""
    pts = [p for p in pts if p[xcol] is not None and p[ycol] is not None]
    if not pts:
        return []
    by_e = _is_e_sweep(pts)
    ns = draw_series(ax, [p[xcol] for p in pts], [p[ycol] for p in pts], label=label, style=style, connect=not by_e)
    if by_e or tag_k:
        for p in pts:
            text = f"e={p.get('active_experts')}" if by_e else f"k={p.get('k')}"
            ax.annotate(
                text,
                (p[xcol].mean, p[ycol].mean),
                textcoords="offset points",
                xytext=(6, -3),
                fontsize=7,
                color=style.get("color"),
            )
    return ns


def _panel_rows(groups: dict[str, list[dict]]) -> list[tuple[str, list[str]]]:
    """(title, group names) for each row of L0 panels."""
    panels = [("All SAEs", sorted(groups))]
    for by, title in MATCH_TITLES.items():
        for base in sorted(
            {
                g[0]["match_baseline"]
                for g in groups.values()
                if g[0].get("match_by") == by and g[0].get("match_baseline") in groups
            }
        ):
            matched = sorted(
                name for name, g in groups.items() if g[0].get("match_by") == by and g[0].get("match_baseline") == base
            )
            panels.append((title.format(base=base), [base, *matched]))
    return panels


def frontier_figure(rows: list[dict]):
    """The figure for table rows (one per SAE, seeds as separate rows), legend and titles
    included, not saved. Raises ValueError when no point has both l0 and l2_per_token."""
    points = [p for p in frontier_points(rows) if p["l0"] is not None and p["l2_per_token"] is not None]
    if not points:
        raise ValueError("the frontier needs rows with finite l0 and l2_per_token; the table has none")
    groups: dict[str, list[dict]] = {}
    for p in points:
        groups.setdefault(p["group"], []).append(p)
    style = group_styles(groups)
    all_ns = [p["n_seeds"] for p in points]
    labels = {g: _label(g, pts) + n_suffix([p["n_seeds"] for p in pts], all_ns) for g, pts in groups.items()}
    panel_rows = _panel_rows(groups)
    cost = [c for c in COST_COLUMNS if any(p[c[0]] is not None for p in points)]
    n_rows = len(panel_rows) + bool(cost)
    fig, axes = plt.subplots(n_rows, 2, figsize=(12, 1.4 + 4.0 * n_rows), constrained_layout=True, squeeze=False)
    drawn: list[int] = []
    for (title, names), ax_row in zip(panel_rows, axes):
        for ax, (col, ylabel) in zip(ax_row, COLUMNS):
            for name in names:
                pts = sorted(groups[name], key=lambda p: p["l0"].mean)
                drawn += _plot_group(ax, "l0", col, pts, labels[name], style[name])
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.set_xlabel(L0_LABEL)
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            if col == "one_minus_lr":
                ax.set_yscale("log")
    if cost:
        _cost_row(axes[-1], cost, groups, labels, style, drawn)
    decorate(fig, axes.flat, TITLE, seeds_note(drawn))
    return fig


def _cost_row(
    ax_row,
    cost: list[tuple[str, str, str]],
    groups: dict[str, list[dict]],
    labels: dict[str, str],
    style: dict[str, dict],
    drawn: list[int],
) -> None:
    """The equal-training-cost panels: l2_per_token vs each cost column the table has, every
    group's points in order of k (then active experts); a missing column's panel says so."""
    present = {c[0] for c in cost}
    for ax, (col, xlabel, title) in zip(ax_row, COST_COLUMNS):
        if col not in present:
            ax.axis("off")
            ax.text(
                0.5,
                0.5,
                f"no {col} in the table",
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=9,
                color="grey",
            )
            continue
        for name in sorted(groups):
            pts = sorted(groups[name], key=lambda p: (p.get("k") or 0, p.get("active_experts") or 1))
            drawn += _plot_group(ax, col, "l2_per_token", pts, labels[name], style[name], tag_k=True)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(_minor_2_5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(L2_LABEL)
        ax.set_title(f"{title}\n(lower-left is better)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)


def plot_frontier(table_parquet: str, out_png: str) -> None:
    """results/table.parquet -> the frontier PNG (written atomically)."""
    save(frontier_figure(pq.read_table(table_parquet).to_pylist()), out_png)
