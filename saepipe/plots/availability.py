"""Which figures a sweep can have (no matplotlib import: the Snakefile calls this at parse time).

Every function takes rows with at least "group", "arch", "k" (and "n_experts" for MoE):
the table's rows, or the sweep's points flattened by `sweep_rows`.
"""
from __future__ import annotations

FIXED_K_ARCHS = {"topk", "batchtopk", "switch", "scale"}
MOE_ARCHS = {"switch", "scale"}


def sweep_rows(points: dict[str, dict]) -> list[dict]:
    """Sweep points (saepipe.sweep.expand_sweep) as table-like rows."""
    return [{"sae_id": sid, "group": p["group"], **p["sae"]} for sid, p in points.items()]


def scaling_ks(rows: list[dict]) -> list[int]:
    """Values of k shared by at least two fixed-k groups (the scaling figure's panels)."""
    fixed = [r for r in rows if r["arch"] in FIXED_K_ARCHS]
    return sorted({r["k"] for r in fixed if len({q["group"] for q in fixed if q["k"] == r["k"]}) >= 2})


def moe_ids(rows: list[dict], arch: set[str] = MOE_ARCHS) -> list[str]:
    return sorted(r["sae_id"] for r in rows if r["arch"] in arch)


def geometry_ids(rows: list[dict], limit: int = 4) -> list[str]:
    """MoE SAEs shown in the feature-geometry figure: the largest-k SAE of each MoE group."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["arch"] in MOE_ARCHS and r.get("n_experts", 8) > 1:
            if r["group"] not in best or r["k"] > best[r["group"]]["k"]:
                best[r["group"]] = r
    return sorted(r["sae_id"] for r in best.values())[:limit]
