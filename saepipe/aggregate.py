"""The `aggregate` stage: one parquet table, a row per SAE (config columns, the architecture's
traits, metrics).

Trait columns (``saepipe.saes.arch_traits``; figures and verdicts read these, never the
``arch`` name): ``arch_label``, ``arch_order``, ``l0_fixed``, ``routed``, ``has_omega``,
``has_threshold``; ``n_experts`` / ``active_experts`` are in every row (1 for dense SAEs).

Metric columns: every field of ``metrics.json`` (``saepipe.evaluate.metrics.SAEMetrics``),
among them the KL divergences (``kl_div_reconstructed``, ``kl_div_zero``, ``kl_div_score``)
and the shrinkage metrics (``cossim``, ``l2_ratio``, ``relative_reconstruction_bias``). A
column an SAE's metrics.json lacks (an older schema) is None in its row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from saepipe.io import atomic_path, read_json
from saepipe.saes.registry import arch_traits


def sae_row(sae_dir: str | Path, metrics_json: str | Path, sweep: dict, extras: Sequence[str] = ()) -> dict:
    """One table row; `sweep` = {"group": name, "point": the id without the seed axis, and for
    matched groups "baseline", "by"}; `extras`: more JSON files of flat columns (e.g.
    autointerp.json) from this SAE's directory.

    `point_id` pools the seeds of one sweep point (figures show their mean and confidence
    interval, verdicts pair them by `seed`); without a "point" each SAE is its own point.
    """
    config = read_json(Path(sae_dir) / "config.json")
    sae_id = Path(sae_dir).name
    row = {
        "sae_id": sae_id,
        "point_id": sweep.get("point", sae_id),
        "group": sweep["group"],
        "match_baseline": sweep.get("baseline"),
        "match_by": sweep.get("by"),
    }
    run = config.pop("run", {})
    row.update({k: v for k, v in config.items() if not isinstance(v, (dict, list))})
    row.update(arch_traits(config["arch"]))
    row.update({f"train_{k}": v for k, v in run.pop("train", {}).items()})
    row.update({k: v for k, v in run.items() if k not in ("wall_time_s", "train_tokens_per_s")})
    row.update(read_json(metrics_json))
    for extra in extras:
        row.update(read_json(extra))
    return row


def aggregate(
    sae_dirs: list[str], metrics: list[str], sweep: list[dict], out_parquet: str, extras: Sequence[str] = ()
) -> pa.Table:
    """Write the table; `extras` are per-SAE JSON files, matched to SAEs by directory."""
    by_dir: dict[Path, list[str]] = {}
    for extra in extras:
        by_dir.setdefault(Path(extra).parent, []).append(extra)
    rows = [sae_row(d, m, g, by_dir.get(Path(d), [])) for d, m, g in zip(sae_dirs, metrics, sweep)]
    columns = sorted({k for r in rows for k in r})
    # None where an architecture lacks a field (e.g. n_experts for TopK)
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
    with atomic_path(out_parquet) as tmp:
        pq.write_table(table, str(tmp))
    return table
