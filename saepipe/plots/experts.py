"""Expert usage figures of MoE SAEs.

- ``plot_expert_usage``: sorted expert-activation CDF and normalised routing entropy (Scale Fig. 6b).
- ``plot_expert_load``: per-expert token share and the balance loss over training.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import math
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.ticker import EngFormatter, PercentFormatter

from saepipe.plots.rows import (
    arch_names,
    finite_list,
    is_moe,
    read_table_rows,
    read_train_log,
    sae_label,
    sae_sort_key,
)
from saepipe.plots.style import TOKENS_AXIS, label_bars, palette, save, shared_legend
from saepipe.stats import finite


def _cdf(r: dict) -> list[float] | None:
    cdf = finite_list(r.get("expert_cdf"))
    if cdf is not None and len(cdf) > 1:
        return cdf
    counts = finite_list(r.get("expert_counts"))
    if counts is None or len(counts) < 2 or sum(counts) <= 0:
        return None
    total, acc, out = sum(counts), 0.0, []
    for c in sorted(counts, reverse=True):
        acc += c
        out.append(acc / total)
    return out


def _entropy(r: dict) -> float | None:
    h = finite(r.get("expert_entropy_normalised"))
    if h is not None:
        return h
    counts = finite_list(r.get("expert_counts"))
    if counts is None or len(counts) < 2 or sum(counts) <= 0:
        return None
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c > 0) / math.log(len(counts))


def plot_expert_usage(table_parquet: str, out_png: str) -> None:
    """Sorted expert-activation CDF per MoE SAE (Scale Fig. 6b) and normalised routing entropy."""
    rows = read_table_rows(table_parquet)
    moe = sorted((r for r in rows if is_moe(r)), key=sae_sort_key)
    if not moe:
        raise ValueError(
            f"plot_expert_usage: {table_parquet} has no MoE SAE (routed architecture trait, "
            f"n_experts > 1); archs present: {arch_names(rows)}"
        )
    cdfs = [(r, c) for r in moe if (c := _cdf(r)) is not None]
    ents = [(r, h) for r in moe if (h := _entropy(r)) is not None]
    if not cdfs and not ents:
        raise ValueError(
            f"plot_expert_usage: the MoE SAEs in {table_parquet} "
            f"({', '.join(str(r.get('sae_id')) for r in moe)}) have no routing statistics "
            "(expert_cdf, expert_counts and expert_entropy_normalised are all missing); "
            "re-run the evaluate stage with the current code"
        )
    color = dict(zip((r["sae_id"] for r in moe), palette(len(moe))))
    n_bars = len(ents)
    widths = ([1.0] if cdfs else []) + ([1.0] if ents else [])
    fig, axes = plt.subplots(
        1,
        len(widths),
        figsize=(6.2 * len(widths), max(5.4, 0.3 * n_bars + 2.2)),
        constrained_layout=True,
        squeeze=False,
    )
    axes = list(axes[0])
    if cdfs:
        ax = axes.pop(0)
        ax.plot([0, 1], [0, 1], ls="--", color="0.45", lw=1.2, label="uniform routing", zorder=1)
        for r, cdf in cdfs:
            n = len(cdf)
            ax.plot(
                [0] + [(i + 1) / n for i in range(n)],
                [0.0] + cdf,
                color=color[r["sae_id"]],
                marker="o" if n <= 32 else None,
                markersize=3.5,
                lw=1.7,
                label=sae_label(r),
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
        ax.set_xlabel("experts, sorted busiest first  (fraction of the N experts)")
        ax.set_ylabel("cumulative share of routings (held-out; e per token)")
        ax.set_title("Sorted expert activation CDF  (diagonal = balanced)")
        ax.grid(True, alpha=0.3)
        if len(cdfs) <= 10:
            ax.legend(loc="lower right", fontsize=7, title="SAE", title_fontsize=7)
        else:  # too many for the empty lower-right triangle: under the figure
            fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8)
    if ents:
        ax = axes.pop(0)
        y = list(range(n_bars))
        vals = [h for _, h in ents]
        bars = ax.barh(y, vals, color=[color[r["sae_id"]] for r, _ in ents], height=0.7)
        label_bars(ax, bars, vals, "{:.3f}", fontsize=8)
        ax.axvline(1.0, ls="--", color="0.45", lw=1.2, zorder=0)
        ax.set_yticks(y, [sae_label(r) for r, _ in ents], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.12)
        ax.set_xlabel("normalised routing entropy  H / log N  (1 = uniform)")
        ax.set_title("Routing entropy (held-out tokens)")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Expert usage of the MoE SAEs (every routed expert: 1 per token for Switch, e for Scale)", fontsize=12)
    save(fig, out_png)


# ----------------------------------------------------------------------------- 2. load
def _load_series(log: list[dict]) -> dict:
    s: dict[str, Any] = {"tok": [], "max": [], "min": [], "cv": [], "btok": [], "balance": [], "N": None}
    for i, row in enumerate(log):
        tok = finite(row.get("tokens"))
        if tok is None:
            tok = finite(row.get("step"))
        if tok is None:
            tok = float(i)
        counts = finite_list(row.get("expert_counts"))
        if counts is not None and len(counts) > 1 and sum(counts) > 0:
            n, total = len(counts), sum(counts)
            load = [c / total * n for c in counts]  # share relative to the uniform 1/N
            mean = sum(load) / n  # = 1
            s["tok"].append(tok)
            s["max"].append(max(load))
            s["min"].append(min(load))
            s["cv"].append(math.sqrt(sum((x - mean) ** 2 for x in load) / n) / mean)
            s["N"] = n
        bal = finite(row.get("balance"))
        if bal is not None:
            s["btok"].append(tok)
            s["balance"].append(bal)
    return s


def plot_expert_load(train_logs: dict[str, str], out_png: str) -> None:
    """Expert load over training per MoE SAE (busiest/idlest expert, CV) and the balance loss."""
    series = {}
    for sae_id, path in sorted(train_logs.items()):
        s = _load_series(read_train_log(path))
        if s["tok"] or s["btok"]:
            series[sae_id] = s
    if not series:
        raise ValueError(
            f"plot_expert_load: none of the {len(train_logs)} train logs "
            f"({', '.join(sorted(train_logs)) or 'none given'}) has MoE routing rows "
            "('expert_counts' or 'balance'); pass the train_log.jsonl of Switch/Scale SAEs"
        )
    color = dict(zip(series, palette(len(series))))
    has_counts = any(s["tok"] for s in series.values())
    has_bal = any(s["btok"] for s in series.values())
    panels = []
    if has_counts:
        panels += [
            ("max", "busiest expert: share × N", "Busiest expert  (1 = uniform)"),
            ("min", "idlest expert: share × N", "Idlest expert  (0 = received no token)"),
            ("cv", "CV of the per-expert token shares", "Load imbalance (coefficient of variation)"),
        ]
    if has_bal:
        panels.append(("balance", "balance loss  α·N·Σ f_i P_i", "Load-balancing loss term"))
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(max(9.0, 6.4 * ncols), 4.0 * nrows + 1.0), constrained_layout=True, squeeze=False
    )
    flat = list(axes.flat)
    for ax in flat[len(panels) :]:
        ax.remove()
    for ax, (key, ylabel, title) in zip(flat, panels):
        for sae_id, s in series.items():
            xs = s["btok"] if key == "balance" else s["tok"]
            if not xs:
                continue
            label = f"{sae_id}  (N={s['N']})" if s["N"] else sae_id
            ax.plot(xs, s[key], color=color[sae_id], lw=1.4, label=label)
        if key in ("max", "min"):
            ax.axhline(1.0, ls="--", color="0.45", lw=1.1, label="uniform load")
        if key in ("min", "cv"):
            ax.set_ylim(bottom=0)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set_xlabel(TOKENS_AXIS)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    shared_legend(fig, flat[: len(panels)], ncol=4)
    fig.suptitle("Expert load during training  (one point per logged batch; top-1 routed expert)", fontsize=12)
    save(fig, out_png)
