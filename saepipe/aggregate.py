"""The `aggregate` stage: one parquet table, a row per SAE (config columns + metrics)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from saepipe.io import atomic_path, read_json



def sae_row(sae_dir: str | Path, metrics_json: str | Path, sweep: dict) -> dict:
    """One table row; `sweep` = {"group": name, and for matched groups "baseline", "by"}."""
    config = read_json(Path(sae_dir) / "config.json")
    row = {"sae_id": Path(sae_dir).name, "group": sweep["group"],
           "match_baseline": sweep.get("baseline"), "match_by": sweep.get("by")}
    run = config.pop("run", {})
    row.update({k: v for k, v in config.items() if not isinstance(v, (dict, list))})
    row.update({f"train_{k}": v for k, v in run.pop("train", {}).items()})
    row.update({k: v for k, v in run.items() if k not in ("wall_time_s", "train_tokens_per_s")})
    row.update(read_json(metrics_json))
    return row


def aggregate(sae_dirs: list[str], metrics: list[str], sweep: list[dict], out_parquet: str) -> pa.Table:
    rows = [sae_row(d, m, g) for d, m, g in zip(sae_dirs, metrics, sweep)]
    columns = sorted({k for r in rows for k in r})
    # None where an architecture lacks a field (e.g. n_experts for TopK)
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
    with atomic_path(out_parquet) as tmp:
        pq.write_table(table, str(tmp))
    return table
