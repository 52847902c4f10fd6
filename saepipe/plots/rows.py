"""Row helpers and conventions shared by the MoE / redundancy figures.

Table rows come from ``results/table.parquet``; values that are ``None``/NaN, or columns an
older table lacks, count as missing (``_num``/``_floats`` return None). What an architecture
is (label, order, measured L0, routed, omega) comes from the row's trait columns
(``saepipe.saes.arch_traits``; :func:`_trait` falls back to the registry for tables without
them, see ``saepipe.plots.availability.row_trait``), never from its ``arch`` name. Figures omit panels
without data (never an empty axes) and raise ``ValueError`` naming what is missing when
nothing applicable is left.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyarrow.parquet as pq

from saepipe.io import atomic_path
from saepipe.plots.availability import row_trait as _trait
from saepipe.stats import finite

MARKERS = "osD^v<>ph*P"
TOKENS_AXIS = "training tokens"


def _rows(table_parquet: str) -> list[dict]:
    return pq.read_table(table_parquet).to_pylist()


_num = finite  # a finite float, or None for None / NaN / inf / non-numbers


def _floats(v) -> list[float] | None:
    """A list of finite floats, or None when missing/empty/containing a missing value."""
    if v is None or isinstance(v, (str, bytes)):
        return None
    try:
        vals = [_num(x) for x in v]
    except TypeError:
        return None
    out = [x for x in vals if x is not None]
    return out if out and len(out) == len(vals) else None


def _val(r: dict, key: str) -> float:
    """``r[key]`` as a finite float, for rows already filtered to have it (ValueError otherwise)."""
    v = _num(r.get(key))
    if v is None:
        raise ValueError(f"{r.get('sae_id')}: {key} is missing in the table; re-run the evaluate stage")
    return v


def _label(r: dict) -> str:
    """Display label of the row's architecture ('TopK', 'ReLU (L1)', ...)."""
    return str(_trait(r, "arch_label"))


def _measured_l0(r: dict) -> bool:
    """True when L0 is measured (ReLU-type SAEs: their `k` is only the expected L0)."""
    return not _trait(r, "l0_fixed")


def _n_experts(r: dict) -> int:
    return int(_num(r.get("n_experts")) or 1)


def _is_moe(r: dict) -> bool:
    return _n_experts(r) > 1 or bool(_trait(r, "routed"))


def _e(r: dict) -> int:
    """Active experts per token: the row's active_experts for routed SAEs, 1 for dense ones."""
    return int(_num(r.get("active_experts")) or 1) if _trait(r, "routed") else 1


def _fs(r: dict) -> bool | None:
    """feature_scaling flag of SAEs with a learned omega (None for others or when unknown)."""
    v = r.get("feature_scaling")
    return bool(v) if _trait(r, "has_omega") and v is not None else None


def _sort_key(r: dict):
    fs = _fs(r)
    return (
        _trait(r, "arch_order"),
        str(r.get("arch")),
        str(r.get("group")),
        _n_experts(r),
        _e(r),
        fs is not False,
        _num(r.get("k")) or 0,
        str(r.get("sae_id")),
    )


def _detail(r: dict) -> str:
    """sae_id with the MoE settings a reader needs: 'scale-k16  (N=8, e=2, ω on)'."""
    parts = []
    if _is_moe(r):
        parts.append(f"N={_n_experts(r)}")
    if _trait(r, "has_omega"):
        parts.append(f"e={_e(r)}")
        if _fs(r) is not None:
            parts.append("ω on" if _fs(r) else "ω off")
    elif r.get("arch") is not None and not _trait(r, "routed") and r["arch"] not in str(r.get("sae_id")):
        parts.append(_label(r))
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
        fig.legend(
            list(seen.values()),
            list(seen.keys()),
            loc="outside lower center",
            ncol=min(ncol, len(seen)),
            fontsize=fontsize,
        )


def _save(fig, out_png: str) -> None:
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


def _bar_values(ax, bars, values, fmt: str = "{:.3g}", fontsize: int = 7) -> None:
    """Value labels at the bar ends, on a white box so reference lines do not cross them."""
    for t in ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=2, fontsize=fontsize):
        t.set_bbox(dict(facecolor="white", edgecolor="none", alpha=0.85, pad=0.6))
