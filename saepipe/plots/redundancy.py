"""Dictionary redundancy and code overlap (Scale paper Figs. 6a, 7, 8).

- ``plot_redundancy``: redundancy_0.9 vs k, vs active experts e, intra vs inter expert (Figs. 8, 6a).
- ``plot_activation_similarity``: activation similarity per SAE, feature scaling off vs on (Fig. 7).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches
import matplotlib.pyplot as plt
from matplotlib.ticker import PercentFormatter, ScalarFormatter

from saepipe.plots.availability import row_trait
from saepipe.plots.rows import (
    active_experts,
    arch_label,
    expert_count,
    feature_scaling_flag,
    is_moe,
    l0_measured,
    read_table_rows,
    required_value,
    sae_label,
    sae_sort_key,
)
from saepipe.plots.style import label_bars, marker, palette, save
from saepipe.stats import finite


def _line_key(r: dict, varying: set[str]) -> tuple:
    return tuple((f, r.get(f)) for f in ("n_experts", "active_experts", "feature_scaling") if f in varying)


def plot_redundancy(table_parquet: str, out_png: str) -> None:
    """redundancy_0.9 vs k per group, vs active experts e (Scale), intra vs inter expert."""
    rows = sorted(read_table_rows(table_parquet), key=sae_sort_key)
    red = [r for r in rows if finite(r.get("redundancy_09")) is not None]
    vs_k = [r for r in red if ((finite(r.get("l0")) if l0_measured(r) else finite(r.get("k"))) or 0) > 0]  # log x axis
    # routed architectures with at least two values of e (Scale; Switch always routes 1)
    e_values: dict[str, set[int]] = {}
    for r in red:
        if row_trait(r, "routed"):
            e_values.setdefault(str(r.get("arch")), set()).add(active_experts(r))
    vs_e = [r for r in red if len(e_values.get(str(r.get("arch")), ())) >= 2]
    spec = [
        r
        for r in rows
        if is_moe(r)
        and finite(r.get("intra_expert_redundancy")) is not None
        and finite(r.get("inter_expert_redundancy")) is not None
    ]
    if not vs_k and not vs_e and not spec:
        raise ValueError(
            f"plot_redundancy: no SAE in {table_parquet} has redundancy_09 (with k) or "
            "intra/inter_expert_redundancy; re-run the evaluate stage with the current code"
        )
    top = [p for p, ok in (("k", vs_k), ("e", vs_e)) if ok]
    mosaic = [top] if top else []
    if spec:
        mosaic.append(["spec"] * max(1, len(top)))
    spec_h = max(3.0, 0.24 * len(spec) + 1.6)
    ratios = ([4.8] if top else []) + ([spec_h] if spec else [])
    fig, axd = plt.subplot_mosaic(
        mosaic, figsize=(13 if len(top) == 2 else 9, sum(ratios) + 0.8), height_ratios=ratios, constrained_layout=True
    )

    def pct():  # one per axis; decimals follow the axis range (0.05% and 80% both read right)
        return PercentFormatter(1.0, decimals=None)

    if vs_k:
        ax = axd["k"]
        groups: dict[str, list[dict]] = {}
        for r in vs_k:
            groups.setdefault(str(r.get("group")), []).append(r)
        lines = []
        for g, grows in groups.items():
            varying = {
                f for f in ("n_experts", "active_experts", "feature_scaling") if len({str(r.get(f)) for r in grows}) > 1
            }
            split: dict[tuple, list[dict]] = {}
            for r in grows:
                split.setdefault(_line_key(r, varying), []).append(r)
            for key, lrows in split.items():
                lines.append((g, key, lrows))
        cols = palette(len(lines))
        for i, (g, key, lrows) in enumerate(lines):
            measured = l0_measured(lrows[0])
            xs = [finite(r.get("l0")) if measured else finite(r.get("k")) for r in lrows]
            pts = sorted(zip(xs, (finite(r["redundancy_09"]) for r in lrows)))
            extra = ", ".join(
                f"N={v}" if f == "n_experts" else f"e={v}" if f == "active_experts" else "ω on" if v else "ω off"
                for f, v in key
            )
            if feature_scaling_flag(lrows[0]) is False and "ω" not in extra:
                extra = ", ".join(x for x in (extra, "ω off") if x)
            label = (
                f"{g}  ({arch_label(lrows[0])}"
                + (f", {extra}" if extra else "")
                + (", at measured L0)" if measured else ")")
            )
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker=marker(i),
                color=cols[i],
                lw=1.6,
                markersize=6,
                label=label,
                ls=":" if measured else ("--" if feature_scaling_flag(lrows[0]) is False else "-"),
                mfc="none" if measured else cols[i],
            )
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_major_formatter(pct())
        ax.set_ylim(bottom=0)
        ax.set_xlabel("k  (active latents per token; L1-type SAEs at their measured L0; log scale)")
        ax.set_ylabel("redundancy: features with max cos > 0.9")
        ax.set_title("Decoder redundancy vs sparsity (Scale Fig. 8)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    if vs_e:
        ax = axd["e"]
        lines_e: dict[tuple, list[dict]] = {}
        for r in vs_e:
            lines_e.setdefault(
                (str(r.get("group")), finite(r.get("k")), feature_scaling_flag(r), expert_count(r)), []
            ).append(r)
        cols = palette(len(lines_e))
        for i, ((g, k, fs, n), lrows) in enumerate(sorted(lines_e.items(), key=lambda kv: str(kv[0]))):
            pts = sorted((active_experts(r), finite(r["redundancy_09"])) for r in lrows)
            kk = f"k={int(k)}" if k is not None else "k=?"
            label = f"{g}  ({kk}, N={n}" + ("" if fs is None else (", ω on" if fs else ", ω off")) + ")"
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker=marker(i),
                color=cols[i],
                lw=1.6,
                markersize=6,
                ls="--" if fs is False else "-",
                label=label,
            )
        es = sorted({active_experts(r) for r in vs_e})
        ax.set_xscale("log", base=2)
        ax.set_xticks(es, [str(e) for e in es])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(pct())
        ax.set_ylim(bottom=0)
        ax.set_xlabel("e  (active experts per token, log scale)")
        ax.set_ylabel("redundancy: features with max cos > 0.9")
        ax.set_title(f"{' / '.join(sorted({arch_label(r) for r in vs_e}))} SAEs: redundancy vs active experts")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    if spec:
        ax = axd["spec"]
        n = len(spec)
        y = list(range(n))
        intra = [required_value(r, "intra_expert_redundancy") for r in spec]
        inter = [required_value(r, "inter_expert_redundancy") for r in spec]
        h = 0.38
        b1 = ax.barh(
            [v - h / 2 for v in y],
            intra,
            height=h,
            color="tab:blue",
            label="intra-expert (within one expert's n = M/N features)",
        )
        b2 = ax.barh(
            [v + h / 2 for v in y],
            inter,
            height=h,
            color="tab:orange",
            label="inter-expert (random n features of the whole dictionary)",
        )
        vmax = max(intra + inter) or 1e-3
        label_bars(ax, b1, intra, "{:.1%}")
        label_bars(ax, b2, inter, "{:.1%}")
        ax.set_yticks(y, [sae_label(r) for r in spec], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, vmax * 1.18)
        ax.xaxis.set_major_formatter(pct())
        ax.set_xlabel("features with max cos > 0.9 to another feature of the same set")
        ax.set_title("Expert specialisation: intra- vs inter-expert redundancy (Scale Fig. 6a)")
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Dictionary redundancy (signed cosine between decoder rows)", fontsize=12)
    save(fig, out_png)


def _arch_bucket(r: dict) -> str:
    if feature_scaling_flag(r) is not None:
        return f"{arch_label(r)}, ω on" if feature_scaling_flag(r) else f"{arch_label(r)}, ω off"
    return arch_label(r)


def plot_activation_similarity(table_parquet: str, out_png: str) -> None:
    """Activation similarity per SAE by architecture, and Scale feature scaling off vs on."""
    rows = read_table_rows(table_parquet)
    sim = sorted((r for r in rows if finite(r.get("activation_similarity")) is not None), key=sae_sort_key)
    if not sim:
        column = "present but empty" if any("activation_similarity" in r for r in rows) else "missing"
        raise ValueError(
            f"plot_activation_similarity: no SAE in {table_parquet} has "
            f"activation_similarity ({len(rows)} rows; column {column}); "
            "re-run the evaluate stage with the current code"
        )
    # feature scaling off vs on: Scale SAEs equal in everything but the flag
    pairs: dict[tuple, dict[bool, dict]] = {}
    for r in sim:
        fs = feature_scaling_flag(r)
        if fs is not None:
            key = (finite(r.get("k")), expert_count(r), active_experts(r), finite(r.get("width")))
            pairs.setdefault(key, {})[fs] = r
    pairs = {k: v for k, v in sorted(pairs.items(), key=lambda kv: tuple(x or 0 for x in kv[0])) if len(v) == 2}
    buckets: list[str] = []
    for r in sim:
        if _arch_bucket(r) not in buckets:
            buckets.append(_arch_bucket(r))
    bcol = {b: palette(len(buckets))[i] for i, b in enumerate(buckets)}
    n = len(sim)
    mosaic = [["all", "pairs"]] if pairs else [["all"]]
    fig, axd = plt.subplot_mosaic(
        mosaic,
        figsize=(14 if pairs else 9, max(5.0, 0.28 * n + 2.0)),
        constrained_layout=True,
        width_ratios=[1.3, 1] if pairs else None,
    )
    ax = axd["all"]
    ys, y, prev = [], 0.0, None
    for r in sim:
        if prev is not None and _arch_bucket(r) != prev:
            y += 0.6  # gap between architectures
        ys.append(y)
        prev = _arch_bucket(r)
        y += 1
    vals = [required_value(r, "activation_similarity") for r in sim]
    bars = ax.barh(ys, vals, height=0.75, color=[bcol[_arch_bucket(r)] for r in sim])
    for b, r in zip(bars, sim):
        if feature_scaling_flag(r) is False:
            b.set_hatch("//")
    label_bars(ax, bars, vals, "{:.3g}")
    ax.set_yticks(ys, [sae_label(r) for r in sim], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(vals) * 1.18 or 1)
    ax.set_xlabel("activation similarity  (mean over token pairs of |S_i ∩ S_j| / measured L0)")
    ax.set_title("Per SAE, grouped by architecture (held-out tokens)")
    ax.grid(True, axis="x", alpha=0.3)
    handles = [
        matplotlib.patches.Patch(facecolor=bcol[b], hatch="//" if b.endswith(", ω off") else None, label=b)
        for b in buckets
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=min(4, len(handles)))
    if pairs:
        ax = axd["pairs"]
        labels, off, on = [], [], []
        for (k, N, e, _w), p in pairs.items():
            labels.append(f"k={int(k) if k is not None else '?'}, N={N}, e={e}")
            off.append(required_value(p[False], "activation_similarity"))
            on.append(required_value(p[True], "activation_similarity"))
        x = list(range(len(labels)))
        w = 0.38
        first = next(iter(pairs.values()))
        b_off = ax.bar(
            [v - w / 2 for v in x],
            off,
            width=w,
            color=bcol.get(_arch_bucket(first[False]), "0.6"),
            hatch="//",
            label="feature scaling off",
        )
        b_on = ax.bar(
            [v + w / 2 for v in x],
            on,
            width=w,
            color=bcol.get(_arch_bucket(first[True]), "tab:red"),
            label="feature scaling on",
        )
        label_bars(ax, b_off, off, "{:.3g}")
        label_bars(ax, b_on, on, "{:.3g}")
        ax.set_xticks(
            x, labels, fontsize=8, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center"
        )
        ax.set_ylim(0, max(off + on) * 1.15 or 1)
        ax.set_ylabel("activation similarity  (lower = more distinct codes)")
        ax.set_title(f"{arch_label(first[True])} SAEs: feature scaling off vs on (Scale Fig. 7)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Activation similarity: overlap of the active-latent sets of two tokens", fontsize=12)
    save(fig, out_png)
