"""Reading the figures' data: table rows, training logs, and what a row says about its SAE.

Table rows come from ``results/table.parquet`` (:func:`read_table_rows`), training logs from
``results/saes/<sae>/train_log.jsonl`` (:func:`read_train_log`). Values that are
``None``/NaN, or columns an older table lacks, count as missing (``saepipe.stats.finite``
and :func:`finite_list` return None). What an architecture is (label, order, measured L0,
routed, omega) comes from the row's trait columns (``saepipe.saes.arch_traits``), read with
``saepipe.plots.availability.row_trait`` (which falls back to the registry for tables
without them), never from its ``arch`` name; the display labels built from traits
(:func:`arch_label`, :func:`sae_label`) are here for that reason.

How rows are drawn (colours, markers, legends, seed points, saving) is in
:mod:`saepipe.plots.style`, which reads no trait: a figure that needs no trait (the
frontier) imports only that module, so its code fingerprint does not follow the
architectures' code. This module imports no matplotlib.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from saepipe.plots.availability import row_trait
from saepipe.stats import finite

# --------------------------------------------------------------------------- reading files


def read_table_rows(table_parquet: str) -> list[dict]:
    """Every row of results/table.parquet (one per SAE) as a dict of column -> value."""
    return pq.read_table(table_parquet).to_pylist()


def read_train_log(path: str) -> list[dict]:
    """The rows of one SAE's train_log.jsonl (one JSON object per non-blank line), in order."""
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


# --------------------------------------------------------------------------- numbers


def finite_list(v) -> list[float] | None:
    """A list cell (expert counts, omega, ...) as finite floats, or None when it is missing,
    empty or holds a missing value."""
    if v is None or isinstance(v, (str, bytes)):
        return None
    try:
        vals = [finite(x) for x in v]
    except TypeError:
        return None
    out = [x for x in vals if x is not None]
    return out if out and len(out) == len(vals) else None


def required_value(r: dict, key: str) -> float:
    """``r[key]`` as a finite float, for rows already filtered to have it (ValueError otherwise)."""
    v = finite(r.get(key))
    if v is None:
        raise ValueError(f"{r.get('sae_id')}: {key} is missing in the table; re-run the evaluate stage")
    return v


# --------------------------------------------------------------------------- what a row's SAE is


def l0_measured(r: dict) -> bool:
    """True when the SAE's L0 is measured rather than fixed (ReLU-type SAEs: their ``k`` is
    only the expected L0)."""
    return not row_trait(r, "l0_fixed")


def expert_count(r: dict) -> int:
    """Number of experts N of the row's SAE (1 for a dense SAE or a missing value)."""
    return int(finite(r.get("n_experts")) or 1)


def is_moe(r: dict) -> bool:
    """The row's SAE is a mixture of experts (more than one expert, or a routed architecture)."""
    return expert_count(r) > 1 or bool(row_trait(r, "routed"))


def active_experts(r: dict) -> int:
    """Active experts per token e: the row's active_experts for routed SAEs, 1 for dense ones."""
    return int(finite(r.get("active_experts")) or 1) if row_trait(r, "routed") else 1


def feature_scaling_flag(r: dict) -> bool | None:
    """feature_scaling flag of SAEs with a learned omega (None for others or when unknown)."""
    v = r.get("feature_scaling")
    return bool(v) if row_trait(r, "has_omega") and v is not None else None


def sae_sort_key(r: dict) -> tuple:
    """Order of SAEs in the figures: architecture (its ``arch_order`` trait), group, number of
    experts, active experts, feature scaling off before on, k, then sae_id."""
    fs = feature_scaling_flag(r)
    return (
        row_trait(r, "arch_order"),
        str(r.get("arch")),
        str(r.get("group")),
        expert_count(r),
        active_experts(r),
        fs is not False,
        finite(r.get("k")) or 0,
        str(r.get("sae_id")),
    )


def arch_names(rows: list[dict]) -> str:
    """The distinct architectures of `rows`, comma-separated, for error messages."""
    return ", ".join(sorted({str(r.get("arch")) for r in rows})) or "none (empty table)"


# --------------------------------------------------------------------------- labels from traits


def arch_label(r: dict) -> str:
    """Display label of the row's architecture ('TopK', 'ReLU (L1)', ...)."""
    return str(row_trait(r, "arch_label"))


def sae_label(r: dict) -> str:
    """sae_id with the MoE settings a reader needs: 'scale-k16  (N=8, e=2, ω on)'."""
    parts = []
    if is_moe(r):
        parts.append(f"N={expert_count(r)}")
    if row_trait(r, "has_omega"):
        parts.append(f"e={active_experts(r)}")
        fs = feature_scaling_flag(r)
        if fs is not None:
            parts.append("ω on" if fs else "ω off")
    elif r.get("arch") is not None and not row_trait(r, "routed") and r["arch"] not in str(r.get("sae_id")):
        parts.append(arch_label(r))
    return f"{r.get('sae_id')}  ({', '.join(parts)})" if parts else str(r.get("sae_id"))
