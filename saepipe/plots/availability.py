"""Which figures a sweep can have (no matplotlib import: the Snakefile calls this at parse time).

Every function takes rows with at least "group", "arch", "k" (and "n_experts" for MoE):
the table's rows, or the sweep's points flattened by `sweep_rows`. What an architecture is
comes from the row's trait columns (``saepipe.saes.arch_traits``: ``l0_fixed``, ``routed``,
``has_omega``, ...; :func:`row_trait`), never from its ``arch`` name.

saepipe.saes is imported by the functions, not here: importing it imports the plugin modules
($SAEPIPE_PLUGINS), and a plugin figure (saepipe.plots.registry) may import this module.
"""

from __future__ import annotations

import dataclasses

UNKNOWN_ARCH_TRAITS = {
    "arch_order": 10_000,
    "l0_fixed": True,
    "routed": False,
    "has_omega": False,
    "has_threshold": False,
}
"""Traits of a row whose arch is neither in the row's trait columns nor registered."""


def row_trait(r: dict, key: str):
    """Architecture trait ``key`` (one of ``TRAIT_COLUMNS``) of a row: its trait column, else
    the registered architecture's trait (tables written before the trait columns), else
    ``UNKNOWN_ARCH_TRAITS`` (label: the arch name)."""
    from saepipe.saes.registry import TRAIT_COLUMNS, arch_traits

    if key not in TRAIT_COLUMNS:
        raise KeyError(f"unknown trait {key!r}; traits: {list(TRAIT_COLUMNS)}")
    v = r.get(key)
    if v is not None and not (isinstance(v, float) and v != v):  # NaN: missing
        return v
    try:
        return arch_traits(str(r.get("arch")))[key]
    except ValueError:
        return str(r.get("arch")) if key == "arch_label" else UNKNOWN_ARCH_TRAITS[key]


def _defaults(arch: str) -> dict:
    """Default values of the architecture's config fields (the fields a sweep group omits)."""
    from saepipe.saes.registry import ARCHITECTURES

    if arch not in ARCHITECTURES:
        return {}
    return {
        f.name: f.default for f in dataclasses.fields(ARCHITECTURES[arch][1]) if f.default is not dataclasses.MISSING
    }


def sweep_rows(points: dict[str, dict]) -> list[dict]:
    """Sweep points (saepipe.sweep.expand_sweep) as table-like rows: the config's defaults,
    the point's fields and the architecture's trait columns."""
    from saepipe.saes.registry import arch_traits

    return [
        {**_defaults(p["sae"]["arch"]), "sae_id": sid, "group": p["group"], **p["sae"], **arch_traits(p["sae"]["arch"])}
        for sid, p in points.items()
    ]


def omega_on(r: dict) -> bool:
    """The row's SAE learns an omega that enters its forward pass (``has_omega`` and its
    ``feature_scaling`` flag, where it has one, not off)."""
    return bool(row_trait(r, "has_omega")) and r.get("feature_scaling") is not False


def scaling_ks(rows: list[dict]) -> list[int]:
    """Values of k shared by at least two fixed-k groups (the scaling figure's panels)."""
    fixed = [r for r in rows if row_trait(r, "l0_fixed")]
    return sorted({r["k"] for r in fixed if len({q["group"] for q in fixed if q["k"] == r["k"]}) >= 2})


def moe_ids(rows: list[dict]) -> list[str]:
    """Routed SAEs (``routed`` trait): the expert usage and load figures."""
    return sorted(r["sae_id"] for r in rows if row_trait(r, "routed"))


def omega_ids(rows: list[dict]) -> list[str]:
    """SAEs whose learned omega is used (:func:`omega_on`): the omega figure."""
    return sorted(r["sae_id"] for r in rows if omega_on(r))


def geometry_ids(rows: list[dict], limit: int = 4) -> list[str]:
    """MoE SAEs shown in the feature-geometry figure: the largest-k SAE of each MoE group."""
    best: dict[str, dict] = {}
    for r in rows:
        if row_trait(r, "routed") and int(r.get("n_experts") or 1) > 1:
            if r["group"] not in best or r["k"] > best[r["group"]]["k"]:
                best[r["group"]] = r
    return sorted(r["sae_id"] for r in best.values())[:limit]
