"""Mixture-of-experts figures (Scale paper Figs. 2, 6, 7, 8).

- ``plot_expert_usage``: sorted expert-activation CDF and normalised routing entropy (Fig. 6b).
- ``plot_expert_load``: per-expert token share and the balance loss over training.
- ``plot_redundancy``: redundancy_0.9 vs k, vs active experts e, intra vs inter expert (Figs. 8, 6a).
- ``plot_omega``: the learned feature-scaling gain omega over training and vs e (Fig. 2).
- ``plot_activation_similarity``: activation similarity per SAE, feature scaling off vs on (Fig. 7).

Each function reads only its arguments (``results/table.parquet`` rows, ``train_log.jsonl``
paths), omits panels that have no data (never an empty axes) and raises ``ValueError``
naming what is missing when nothing applicable is left. Values that are ``None``/NaN or
columns that an older table lacks count as missing.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter, PercentFormatter, ScalarFormatter  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from saepipe.io import atomic_path  # noqa: E402

ARCH_ORDER = ("topk", "batchtopk", "relu", "jumprelu", "gated", "switch", "scale")
ARCH_LABEL = {"topk": "TopK", "batchtopk": "BatchTopK", "relu": "ReLU (L1)", "jumprelu": "JumpReLU",
              "gated": "Gated", "switch": "Switch", "scale": "Scale"}
ARCH_COLOR = {a: plt.get_cmap("tab10")(i) for i, a in enumerate(ARCH_ORDER)}
MEASURED_L0_ARCHS = ("relu", "jumprelu", "gated")  # their `k` is only the expected L0
MARKERS = "osD^v<>ph*P"
TOKENS_AXIS = "training tokens"


# ----------------------------------------------------------------------------- helpers
def _rows(table_parquet: str) -> list[dict]:
    return pq.read_table(table_parquet).to_pylist()


def _num(v) -> float | None:
    """A finite float, or None for None / NaN / inf / non-numbers."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _floats(v) -> list[float] | None:
    """A list of finite floats, or None when missing/empty/containing a missing value."""
    if v is None or isinstance(v, (str, bytes)):
        return None
    try:
        out = [_num(x) for x in v]
    except TypeError:
        return None
    return out if out and all(x is not None for x in out) else None


def _n_experts(r: dict) -> int:
    return int(_num(r.get("n_experts")) or 1)


def _is_moe(r: dict) -> bool:
    return _n_experts(r) > 1 or r.get("arch") in ("switch", "scale")


def _e(r: dict) -> int:
    """Active experts per token: Scale's e, 1 for everything else."""
    return int(_num(r.get("active_experts")) or 1) if r.get("arch") == "scale" else 1


def _fs(r: dict) -> bool | None:
    """Scale's feature_scaling flag (None for other archs or when unknown)."""
    v = r.get("feature_scaling")
    return bool(v) if r.get("arch") == "scale" and v is not None else None


def _sort_key(r: dict):
    arch = r.get("arch")
    fs = _fs(r)
    return (ARCH_ORDER.index(arch) if arch in ARCH_ORDER else len(ARCH_ORDER), str(arch),
            str(r.get("group")), _n_experts(r), _e(r), fs is not False, _num(r.get("k")) or 0,
            str(r.get("sae_id")))


def _detail(r: dict) -> str:
    """sae_id with the MoE settings a reader needs: 'scale-k16  (N=8, e=2, ω on)'."""
    parts = []
    if _is_moe(r):
        parts.append(f"N={_n_experts(r)}")
    if r.get("arch") == "scale":
        parts.append(f"e={_e(r)}")
        if _fs(r) is not None:
            parts.append("ω on" if _fs(r) else "ω off")
    elif r.get("arch") not in (None, "switch") and r.get("arch") not in str(r.get("sae_id")):
        parts.append(ARCH_LABEL.get(r["arch"], r["arch"]))
    return f"{r.get('sae_id')}  ({', '.join(parts)})" if parts else str(r.get("sae_id"))


def _palette(n: int) -> list:
    """n distinct colours: tab10, then tab20's ten lighter shades (tab20 order would put
    two shades of one hue next to each other)."""
    t20 = plt.get_cmap("tab20")
    order = [t20(2 * i) for i in range(10)] + [t20(2 * i + 1) for i in range(10)]
    return [order[i % 20] for i in range(n)]


def _read_log(path: str) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def _arches(rows: list[dict]) -> str:
    return ", ".join(sorted({str(r.get("arch")) for r in rows})) or "none (empty table)"


def _shared_legend(fig, axes, ncol: int = 4, fontsize: int = 8) -> None:
    """One legend under the panels with every distinct label of `axes`."""
    seen: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if not lab.startswith("_"):
                seen.setdefault(lab, h)
    if seen:
        fig.legend(list(seen.values()), list(seen.keys()), loc="outside lower center",
                   ncol=min(ncol, len(seen)), fontsize=fontsize)


def _save(fig, out_png: str) -> None:
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


def _bar_values(ax, bars, values, fmt: str = "{:.3g}", fontsize: int = 7) -> None:
    """Value labels at the bar ends, on a white box so reference lines do not cross them."""
    for t in ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=2, fontsize=fontsize):
        t.set_bbox(dict(facecolor="white", edgecolor="none", alpha=0.85, pad=0.6))


# ----------------------------------------------------------------------------- 1. usage
def _cdf(r: dict) -> list[float] | None:
    cdf = _floats(r.get("expert_cdf"))
    if cdf is not None and len(cdf) > 1:
        return cdf
    counts = _floats(r.get("expert_counts"))
    if counts is None or len(counts) < 2 or sum(counts) <= 0:
        return None
    total, acc, out = sum(counts), 0.0, []
    for c in sorted(counts, reverse=True):
        acc += c
        out.append(acc / total)
    return out


def _entropy(r: dict) -> float | None:
    h = _num(r.get("expert_entropy_normalised"))
    if h is not None:
        return h
    counts = _floats(r.get("expert_counts"))
    if counts is None or len(counts) < 2 or sum(counts) <= 0:
        return None
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c > 0) / math.log(len(counts))


def plot_expert_usage(table_parquet: str, out_png: str) -> None:
    """Sorted expert-activation CDF per MoE SAE (Scale Fig. 6b) and normalised routing entropy."""
    rows = _rows(table_parquet)
    moe = sorted((r for r in rows if _is_moe(r)), key=_sort_key)
    if not moe:
        raise ValueError(f"plot_expert_usage: {table_parquet} has no MoE SAE (arch switch/scale, "
                         f"n_experts > 1); archs present: {_arches(rows)}")
    cdfs = [(r, _cdf(r)) for r in moe]
    cdfs = [(r, c) for r, c in cdfs if c is not None]
    ents = [(r, _entropy(r)) for r in moe]
    ents = [(r, h) for r, h in ents if h is not None]
    if not cdfs and not ents:
        raise ValueError(f"plot_expert_usage: the MoE SAEs in {table_parquet} "
                         f"({', '.join(str(r.get('sae_id')) for r in moe)}) have no routing statistics "
                         "(expert_cdf, expert_counts and expert_entropy_normalised are all missing); "
                         "re-run the evaluate stage with the current code")
    color = dict(zip((r["sae_id"] for r in moe), _palette(len(moe))))
    n_bars = len(ents)
    widths = ([1.0] if cdfs else []) + ([1.0] if ents else [])
    fig, axes = plt.subplots(1, len(widths), figsize=(6.2 * len(widths), max(5.4, 0.3 * n_bars + 2.2)),
                             constrained_layout=True, squeeze=False)
    axes = list(axes[0])
    if cdfs:
        ax = axes.pop(0)
        ax.plot([0, 1], [0, 1], ls="--", color="0.45", lw=1.2, label="uniform routing", zorder=1)
        for r, cdf in cdfs:
            n = len(cdf)
            ax.plot([0] + [(i + 1) / n for i in range(n)], [0.0] + cdf, color=color[r["sae_id"]],
                    marker="o" if n <= 32 else None, markersize=3.5, lw=1.7, label=_detail(r))
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
        ax.set_xlabel("experts, sorted busiest first  (fraction of the N experts)")
        ax.set_ylabel("cumulative share of routed tokens (held-out)")
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
        _bar_values(ax, bars, vals, "{:.3f}", fontsize=8)
        ax.axvline(1.0, ls="--", color="0.45", lw=1.2, zorder=0)
        ax.set_yticks(y, [_detail(r) for r, _ in ents], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.12)
        ax.set_xlabel("normalised routing entropy  H / log N  (1 = uniform)")
        ax.set_title("Routing entropy (held-out tokens)")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Expert usage of the MoE SAEs (top-1 routed expert per token)", fontsize=12)
    _save(fig, out_png)


# ----------------------------------------------------------------------------- 2. load
def _load_series(log: list[dict]) -> dict:
    s = {"tok": [], "max": [], "min": [], "cv": [], "btok": [], "balance": [], "N": None}
    for i, row in enumerate(log):
        tok = _num(row.get("tokens"))
        if tok is None:
            tok = _num(row.get("step"))
        if tok is None:
            tok = float(i)
        counts = _floats(row.get("expert_counts"))
        if counts is not None and len(counts) > 1 and sum(counts) > 0:
            n, total = len(counts), sum(counts)
            load = [c / total * n for c in counts]  # share relative to the uniform 1/N
            mean = sum(load) / n  # = 1
            s["tok"].append(tok)
            s["max"].append(max(load))
            s["min"].append(min(load))
            s["cv"].append(math.sqrt(sum((x - mean) ** 2 for x in load) / n) / mean)
            s["N"] = n
        bal = _num(row.get("balance"))
        if bal is not None:
            s["btok"].append(tok)
            s["balance"].append(bal)
    return s


def plot_expert_load(train_logs: dict[str, str], out_png: str) -> None:
    """Expert load over training per MoE SAE (busiest/idlest expert, CV) and the balance loss."""
    series = {}
    for sae_id, path in sorted(train_logs.items()):
        s = _load_series(_read_log(path))
        if s["tok"] or s["btok"]:
            series[sae_id] = s
    if not series:
        raise ValueError(f"plot_expert_load: none of the {len(train_logs)} train logs "
                         f"({', '.join(sorted(train_logs)) or 'none given'}) has MoE routing rows "
                         "('expert_counts' or 'balance'); pass the train_log.jsonl of Switch/Scale SAEs")
    color = dict(zip(series, _palette(len(series))))
    has_counts = any(s["tok"] for s in series.values())
    has_bal = any(s["btok"] for s in series.values())
    panels = []
    if has_counts:
        panels += [("max", "busiest expert: share × N", "Busiest expert  (1 = uniform)"),
                   ("min", "idlest expert: share × N", "Idlest expert  (0 = received no token)"),
                   ("cv", "CV of the per-expert token shares", "Load imbalance (coefficient of variation)")]
    if has_bal:
        panels.append(("balance", "balance loss  α·N·Σ f_i P_i", "Load-balancing loss term"))
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(9.0, 6.4 * ncols), 4.0 * nrows + 1.0),
                             constrained_layout=True, squeeze=False)
    flat = list(axes.flat)
    for ax in flat[len(panels):]:
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
    _shared_legend(fig, flat[: len(panels)], ncol=4)
    fig.suptitle("Expert load during training  (one point per logged batch; top-1 routed expert)",
                 fontsize=12)
    _save(fig, out_png)


# ----------------------------------------------------------------------------- 3. redundancy
def _line_key(r: dict, varying: set[str]) -> tuple:
    return tuple((f, r.get(f)) for f in ("n_experts", "active_experts", "feature_scaling")
                 if f in varying)


def plot_redundancy(table_parquet: str, out_png: str) -> None:
    """redundancy_0.9 vs k per group, vs active experts e (Scale), intra vs inter expert."""
    rows = sorted(_rows(table_parquet), key=_sort_key)
    red = [r for r in rows if _num(r.get("redundancy_09")) is not None]
    vs_k = [r for r in red if ((_num(r.get("l0")) if r.get("arch") in MEASURED_L0_ARCHS
                                else _num(r.get("k"))) or 0) > 0]  # log x axis
    scale = [r for r in red if r.get("arch") == "scale"]
    vs_e = scale if len({_e(r) for r in scale}) >= 2 else []
    spec = [r for r in rows if _is_moe(r) and _num(r.get("intra_expert_redundancy")) is not None
            and _num(r.get("inter_expert_redundancy")) is not None]
    if not vs_k and not vs_e and not spec:
        raise ValueError(f"plot_redundancy: no SAE in {table_parquet} has redundancy_09 (with k) or "
                         "intra/inter_expert_redundancy; re-run the evaluate stage with the current code")
    top = [p for p, ok in (("k", vs_k), ("e", vs_e)) if ok]
    mosaic = [top] if top else []
    if spec:
        mosaic.append(["spec"] * max(1, len(top)))
    spec_h = max(3.0, 0.24 * len(spec) + 1.6)
    ratios = ([4.8] if top else []) + ([spec_h] if spec else [])
    fig, axd = plt.subplot_mosaic(mosaic, figsize=(13 if len(top) == 2 else 9, sum(ratios) + 0.8),
                                  height_ratios=ratios, constrained_layout=True)
    pct = PercentFormatter(1.0, decimals=1)
    if vs_k:
        ax = axd["k"]
        groups: dict[str, list[dict]] = {}
        for r in vs_k:
            groups.setdefault(str(r.get("group")), []).append(r)
        lines = []
        for g, grows in groups.items():
            varying = {f for f in ("n_experts", "active_experts", "feature_scaling")
                       if len({str(r.get(f)) for r in grows}) > 1}
            split: dict[tuple, list[dict]] = {}
            for r in grows:
                split.setdefault(_line_key(r, varying), []).append(r)
            for key, lrows in split.items():
                lines.append((g, key, lrows))
        cols = _palette(len(lines))
        for i, (g, key, lrows) in enumerate(lines):
            arch = lrows[0].get("arch")
            measured = arch in MEASURED_L0_ARCHS
            xs = [_num(r.get("l0")) if measured else _num(r.get("k")) for r in lrows]
            pts = sorted(zip(xs, (_num(r["redundancy_09"]) for r in lrows)))
            extra = ", ".join(f"N={v}" if f == "n_experts" else f"e={v}" if f == "active_experts"
                              else "ω on" if v else "ω off" for f, v in key)
            if _fs(lrows[0]) is False and "ω" not in extra:
                extra = ", ".join(x for x in (extra, "ω off") if x)
            label = f"{g}  ({ARCH_LABEL.get(arch, arch)}" + (f", {extra}" if extra else "") + \
                (", at measured L0)" if measured else ")")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[i % len(MARKERS)],
                    color=cols[i], lw=1.6, markersize=6, label=label,
                    ls=":" if measured else ("--" if _fs(lrows[0]) is False else "-"),
                    mfc="none" if measured else cols[i])
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_major_formatter(pct)
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
            lines_e.setdefault((str(r.get("group")), _num(r.get("k")), _fs(r), _n_experts(r)), []).append(r)
        cols = _palette(len(lines_e))
        for i, ((g, k, fs, n), lrows) in enumerate(sorted(lines_e.items(), key=lambda kv: str(kv[0]))):
            pts = sorted((_e(r), _num(r["redundancy_09"])) for r in lrows)
            kk = f"k={int(k)}" if k is not None else "k=?"
            label = f"{g}  ({kk}, N={n}" + ("" if fs is None else (", ω on" if fs else ", ω off")) + ")"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[i % len(MARKERS)],
                    color=cols[i], lw=1.6, markersize=6, ls="--" if fs is False else "-", label=label)
        es = sorted({_e(r) for r in vs_e})
        ax.set_xscale("log", base=2)
        ax.set_xticks(es, [str(e) for e in es])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(pct)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("e  (active experts per token, log scale)")
        ax.set_ylabel("redundancy: features with max cos > 0.9")
        ax.set_title("Scale SAEs: redundancy vs active experts")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    if spec:
        ax = axd["spec"]
        n = len(spec)
        y = list(range(n))
        intra = [_num(r["intra_expert_redundancy"]) for r in spec]
        inter = [_num(r["inter_expert_redundancy"]) for r in spec]
        h = 0.38
        b1 = ax.barh([v - h / 2 for v in y], intra, height=h, color="tab:blue",
                     label="intra-expert (within one expert's n = M/N features)")
        b2 = ax.barh([v + h / 2 for v in y], inter, height=h, color="tab:orange",
                     label="inter-expert (random n features of the whole dictionary)")
        vmax = max(intra + inter) or 1e-3
        _bar_values(ax, b1, intra, "{:.1%}")
        _bar_values(ax, b2, inter, "{:.1%}")
        ax.set_yticks(y, [_detail(r) for r in spec], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, vmax * 1.18)
        ax.xaxis.set_major_formatter(pct)
        ax.set_xlabel("features with max cos > 0.9 to another feature of the same set")
        ax.set_title("Expert specialisation: intra- vs inter-expert redundancy (Scale Fig. 6a)")
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Dictionary redundancy (signed cosine between decoder rows)", fontsize=12)
    _save(fig, out_png)


# ----------------------------------------------------------------------------- 4. omega
def plot_omega(table_parquet: str, train_logs: dict[str, str], out_png: str) -> None:
    """Learned omega of every expert over training (one small panel per Scale SAE) and the
    final omega (mean, min–max over experts) vs active experts e."""
    rows = {r.get("sae_id"): r for r in _rows(table_parquet)}
    # SAEs with feature scaling off keep omega at 0 (unused), so they are left out.
    on = sorted((r for r in rows.values() if r.get("arch") == "scale" and _fs(r) is not False),
                key=_sort_key)
    traj: dict[str, tuple[list[float], list[list[float]]]] = {}
    for sae_id, path in sorted(train_logs.items(),
                               key=lambda kv: _sort_key(rows.get(kv[0], {"sae_id": kv[0]}))):
        r = rows.get(sae_id)
        if r is not None and (r.get("arch") != "scale" or _fs(r) is False):
            continue
        tok, oms = [], []
        for i, row in enumerate(_read_log(path)):
            om = _floats(row.get("omega"))
            if om is None:
                continue
            t = _num(row.get("tokens"))
            tok.append(t if t is not None else (_num(row.get("step")) or float(i)))
            oms.append(om)
        if tok and any(v != 0.0 for om in oms for v in om):  # all-zero: feature scaling off
            traj[sae_id] = (tok, oms)
    final = []
    for r in on:
        om = _floats(r.get("omega"))
        if om is None and r.get("sae_id") in traj:  # older table: last logged omega
            om = traj[r["sae_id"]][1][-1]
        if om is not None:
            final.append((r, sum(om) / len(om), min(om), max(om)))
    if not traj and not final:
        raise ValueError(
            f"plot_omega: no Scale SAE with feature scaling on has a learned omega: {table_parquet} "
            f"has {sum(r.get('arch') == 'scale' for r in rows.values())} Scale rows "
            f"({len(on)} with feature scaling on, omega column "
            f"{'present' if any('omega' in r for r in rows.values()) else 'missing'}) and none of the "
            f"{len(train_logs)} train logs has non-zero 'omega' rows")
    ncols = min(3, len(traj)) if traj else 0
    nrows = math.ceil(len(traj) / ncols) if traj else 1
    w_traj, w_final = 3.7 * ncols, (6.0 if final else 0.0)
    fig = plt.figure(figsize=(w_traj + w_final, max(5.0, 2.7 * nrows + 1.4)), layout="constrained")
    subs = fig.subfigures(1, 2, width_ratios=[w_traj, w_final]) if traj and final else [fig]
    if traj:
        sub = subs[0]
        axes = sub.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
        flat = list(axes.flat)
        for ax in flat[len(traj):]:
            ax.remove()
        for ax, (sae_id, (tok, oms)) in zip(flat, traj.items()):
            n = len(oms[0])
            cols = plt.get_cmap("viridis")([i / max(1, n - 1) for i in range(n)])
            for i in range(n):
                ax.plot(tok, [om[i] if i < len(om) else float("nan") for om in oms], color=cols[i],
                        lw=0.9, alpha=0.85)
            ax.plot(tok, [sum(om) / len(om) for om in oms], color="black", lw=1.8)
            ax.axhline(0.0, color="0.45", lw=0.9, ls="--")
            r = rows.get(sae_id)
            ax.set_title(_detail(r) if r is not None else sae_id, fontsize=8)
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
        for ax in flat[: len(traj)]:
            if flat.index(ax) + ncols >= len(traj):  # no panel below it
                ax.set_xlabel(TOKENS_AXIS, fontsize=8)
                ax.xaxis.set_tick_params(labelbottom=True)
            if ax.get_subplotspec().is_first_col():
                ax.set_ylabel("ω", fontsize=9)
        sub.suptitle("ω of each expert during training  (thin: one expert, colour = expert index; "
                     "black: mean)", fontsize=9)
    if final:
        ax = subs[-1].subplots()
        lines: dict[tuple, list] = {}
        for item in final:
            r = item[0]
            lines.setdefault((str(r.get("group")), _num(r.get("k")), _n_experts(r)), []).append(item)
        cols = _palette(len(lines))
        for i, ((g, k, n), items) in enumerate(sorted(lines.items(), key=lambda kv: str(kv[0]))):
            items = sorted(items, key=lambda it: _e(it[0]))
            dodge = 2 ** (0.035 * (i - (len(lines) - 1) / 2))  # keep error bars apart
            es = [_e(it[0]) * dodge for it in items]
            m = [it[1] for it in items]
            err = [[it[1] - it[2] for it in items], [it[3] - it[1] for it in items]]
            kk = f"k={int(k)}" if k is not None else "k=?"
            ax.errorbar(es, m, yerr=err, color=cols[i], marker=MARKERS[i % len(MARKERS)], lw=1.6,
                        capsize=4, markersize=6, label=f"{g}  ({kk}, N={n})")
        all_e = sorted({_e(it[0]) for it in final})
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
    fig.suptitle("Scale SAE feature scaling  Ŵ = W̄ + (1 + ω)(W_enc − W̄)  (Scale Fig. 2; "
                 "SAEs with feature scaling off keep ω = 0 and are not shown)", fontsize=11)
    _save(fig, out_png)


# ----------------------------------------------------------------------------- 5. similarity
def _arch_bucket(r: dict) -> str:
    if r.get("arch") == "scale" and _fs(r) is not None:
        return "Scale, ω on" if _fs(r) else "Scale, ω off"
    return ARCH_LABEL.get(r.get("arch"), str(r.get("arch")))


def plot_activation_similarity(table_parquet: str, out_png: str) -> None:
    """Activation similarity per SAE by architecture, and Scale feature scaling off vs on."""
    rows = _rows(table_parquet)
    sim = sorted((r for r in rows if _num(r.get("activation_similarity")) is not None), key=_sort_key)
    if not sim:
        column = "present but empty" if any("activation_similarity" in r for r in rows) else "missing"
        raise ValueError(f"plot_activation_similarity: no SAE in {table_parquet} has "
                         f"activation_similarity ({len(rows)} rows; column {column}); "
                         "re-run the evaluate stage with the current code")
    # feature scaling off vs on: Scale SAEs equal in everything but the flag
    pairs: dict[tuple, dict[bool, dict]] = {}
    for r in sim:
        if _fs(r) is not None:
            key = (_num(r.get("k")), _n_experts(r), _e(r), _num(r.get("width")))
            pairs.setdefault(key, {})[_fs(r)] = r
    pairs = {k: v for k, v in sorted(pairs.items(), key=lambda kv: tuple(x or 0 for x in kv[0]))
             if len(v) == 2}
    buckets: list[str] = []
    for r in sim:
        if _arch_bucket(r) not in buckets:
            buckets.append(_arch_bucket(r))
    bcol = {b: _palette(len(buckets))[i] for i, b in enumerate(buckets)}
    n = len(sim)
    mosaic = [["all", "pairs"]] if pairs else [["all"]]
    fig, axd = plt.subplot_mosaic(mosaic, figsize=(14 if pairs else 9, max(5.0, 0.28 * n + 2.0)),
                                  constrained_layout=True, width_ratios=[1.3, 1] if pairs else None)
    ax = axd["all"]
    ys, y, prev = [], 0.0, None
    for r in sim:
        if prev is not None and _arch_bucket(r) != prev:
            y += 0.6  # gap between architectures
        ys.append(y)
        prev = _arch_bucket(r)
        y += 1
    vals = [_num(r["activation_similarity"]) for r in sim]
    bars = ax.barh(ys, vals, height=0.75, color=[bcol[_arch_bucket(r)] for r in sim])
    for b, r in zip(bars, sim):
        if _fs(r) is False:
            b.set_hatch("//")
    _bar_values(ax, bars, vals, "{:.3g}")
    ax.set_yticks(ys, [_detail(r) for r in sim], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(vals) * 1.18 or 1)
    ax.set_xlabel("activation similarity  (mean over token pairs of |S_i ∩ S_j| / k)")
    ax.set_title("Per SAE, grouped by architecture (held-out tokens)")
    ax.grid(True, axis="x", alpha=0.3)
    handles = [matplotlib.patches.Patch(facecolor=bcol[b], hatch="//" if b == "Scale, ω off" else None,
                                        label=b) for b in buckets]
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09),
              ncol=min(4, len(handles)))
    if pairs:
        ax = axd["pairs"]
        labels, off, on = [], [], []
        for (k, N, e, _w), p in pairs.items():
            labels.append(f"k={int(k) if k is not None else '?'}, N={N}, e={e}")
            off.append(_num(p[False]["activation_similarity"]))
            on.append(_num(p[True]["activation_similarity"]))
        x = list(range(len(labels)))
        w = 0.38
        b_off = ax.bar([v - w / 2 for v in x], off, width=w, color=bcol.get("Scale, ω off", "0.6"),
                       hatch="//", label="feature scaling off")
        b_on = ax.bar([v + w / 2 for v in x], on, width=w, color=bcol.get("Scale, ω on", "tab:red"),
                      label="feature scaling on")
        _bar_values(ax, b_off, off, "{:.3g}")
        _bar_values(ax, b_on, on, "{:.3g}")
        ax.set_xticks(x, labels, fontsize=8, rotation=30 if len(labels) > 4 else 0,
                      ha="right" if len(labels) > 4 else "center")
        ax.set_ylim(0, max(off + on) * 1.15 or 1)
        ax.set_ylabel("activation similarity  (lower = more distinct codes)")
        ax.set_title("Scale SAEs: feature scaling off vs on (Scale Fig. 7)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Activation similarity: overlap of the active-latent sets of two tokens", fontsize=12)
    _save(fig, out_png)
