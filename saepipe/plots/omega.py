"""The learned feature-scaling gain omega (Scale paper Fig. 2) of the SAEs that have one
(``has_omega`` trait: Scale)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import math

import matplotlib.pyplot as plt
from matplotlib.ticker import EngFormatter

from saepipe.plots.availability import row_trait
from saepipe.plots.rows import (
    active_experts,
    expert_count,
    feature_scaling_flag,
    finite_list,
    read_table_rows,
    read_train_log,
    sae_label,
    sae_sort_key,
)
from saepipe.plots.style import TOKENS_AXIS, marker, palette, save
from saepipe.stats import finite


def plot_omega(table_parquet: str, train_logs: dict[str, str], out_png: str) -> None:
    """Learned omega of every expert over training (one small panel per Scale SAE) and the
    final omega (mean, min–max over experts) vs active experts e."""
    rows = {r.get("sae_id"): r for r in read_table_rows(table_parquet)}
    # SAEs with feature scaling off keep omega at 0 (unused), so they are left out.
    on = sorted(
        (r for r in rows.values() if row_trait(r, "has_omega") and feature_scaling_flag(r) is not False),
        key=sae_sort_key,
    )
    traj: dict[str, tuple[list[float], list[list[float]]]] = {}
    for sae_id, path in sorted(train_logs.items(), key=lambda kv: sae_sort_key(rows.get(kv[0], {"sae_id": kv[0]}))):
        r = rows.get(sae_id)
        if r is not None and (not row_trait(r, "has_omega") or feature_scaling_flag(r) is False):
            continue
        tok, oms = [], []
        for i, row in enumerate(read_train_log(path)):
            om = finite_list(row.get("omega"))
            if om is None:
                continue
            t = finite(row.get("tokens"))
            tok.append(t if t is not None else (finite(row.get("step")) or float(i)))
            oms.append(om)
        if tok and any(v != 0.0 for om in oms for v in om):  # all-zero: feature scaling off
            traj[sae_id] = (tok, oms)
    final = []
    for r in on:
        om = finite_list(r.get("omega"))
        if om is None and r.get("sae_id") in traj:  # older table: last logged omega
            om = traj[r["sae_id"]][1][-1]
        if om is not None:
            final.append((r, sum(om) / len(om), min(om), max(om)))
    if not traj and not final:
        raise ValueError(
            f"plot_omega: no Scale SAE with feature scaling on has a learned omega: {table_parquet} "
            f"has {sum(bool(row_trait(r, 'has_omega')) for r in rows.values())} rows of SAEs with an omega "
            f"({len(on)} with feature scaling on, omega column "
            f"{'present' if any('omega' in r for r in rows.values()) else 'missing'}) and none of the "
            f"{len(train_logs)} train logs has non-zero 'omega' rows"
        )
    ncols = min(3, len(traj)) if traj else 0
    nrows = math.ceil(len(traj) / ncols) if traj else 1
    w_traj, w_final = 3.7 * ncols, (6.0 if final else 0.0)
    fig = plt.figure(figsize=(w_traj + w_final, max(5.0, 2.7 * nrows + 1.4)), layout="constrained")
    subs = fig.subfigures(1, 2, width_ratios=[w_traj, w_final]) if traj and final else [fig]
    if traj:
        sub = subs[0]
        axes = sub.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
        flat = list(axes.flat)
        for ax in flat[len(traj) :]:
            ax.remove()
        for ax, (sae_id, (tok, oms)) in zip(flat, traj.items()):
            n = len(oms[0])
            cols = plt.get_cmap("viridis")([i / max(1, n - 1) for i in range(n)])
            for i in range(n):
                ax.plot(tok, [om[i] if i < len(om) else float("nan") for om in oms], color=cols[i], lw=0.9, alpha=0.85)
            ax.plot(tok, [sum(om) / len(om) for om in oms], color="black", lw=1.8)
            ax.axhline(0.0, color="0.45", lw=0.9, ls="--")
            r = rows.get(sae_id)
            ax.set_title(sae_label(r) if r is not None else sae_id, fontsize=8)
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
        for ax in flat[: len(traj)]:
            if flat.index(ax) + ncols >= len(traj):  # no panel below it
                ax.set_xlabel(TOKENS_AXIS, fontsize=8)
                ax.xaxis.set_tick_params(labelbottom=True)
            if ax.get_subplotspec().is_first_col():
                ax.set_ylabel("ω", fontsize=9)
        sub.suptitle(
            "ω of each expert during training  (thin: one expert, colour = expert index; black: mean)", fontsize=9
        )
    if final:
        ax = subs[-1].subplots()
        lines: dict[tuple, list] = {}
        for item in final:
            r = item[0]
            lines.setdefault((str(r.get("group")), finite(r.get("k")), expert_count(r)), []).append(item)
        cols = palette(len(lines))
        for i, ((g, k, n), items) in enumerate(sorted(lines.items(), key=lambda kv: str(kv[0]))):
            items = sorted(items, key=lambda it: active_experts(it[0]))
            dodge = 2 ** (0.035 * (i - (len(lines) - 1) / 2))  # keep error bars apart
            es = [active_experts(it[0]) * dodge for it in items]
            m = [it[1] for it in items]
            err = [[it[1] - it[2] for it in items], [it[3] - it[1] for it in items]]
            kk = f"k={int(k)}" if k is not None else "k=?"
            ax.errorbar(
                es,
                m,
                yerr=err,
                color=cols[i],
                marker=marker(i),
                lw=1.6,
                capsize=4,
                markersize=6,
                label=f"{g}  ({kk}, N={n})",
            )
        all_e = sorted({active_experts(it[0]) for it in final})
        ax.axhline(0.0, color="0.45", lw=1.0, ls="--")
        if len(all_e) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(all_e, [str(e) for e in all_e])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if len(all_e) == 1:
            ax.set_xlim(all_e[0] - 1, all_e[0] + 1)
        ax.set_xlabel("e  (active experts per token" + (", log scale)" if len(all_e) > 1 else ")"))
        ax.set_ylabel("final ω  (mean over experts; bars = min–max over experts)")
        ax.set_title("Final ω vs active experts", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(
        "Scale SAE feature scaling  Ŵ = W̄ + (1 + ω)(W_enc − W̄)  (Scale Fig. 2; "
        "SAEs with feature scaling off keep ω = 0 and are not shown)",
        fontsize=11,
    )
    save(fig, out_png)
