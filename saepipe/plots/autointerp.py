"""Autointerp detection accuracy per SAE: one dot per judged feature, a bar for the mean.

Registered as figure ``autointerp`` (saepipe.plots.registry, input kind ``"autointerp"``):
built only when the autointerp stage is on (config ``autointerp.enabled``).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq

from saepipe.plots.style import finish, group_styles


def plot_autointerp(table_parquet: str, verdict_parquets: list[str], out_png: str) -> None:
    """Detection accuracy of every judged feature (dots) and its SAE's mean (bar), SAEs in
    order of group then k, coloured by group (`group_styles`).

    ``verdict_parquets``: the inspected SAEs' results/saes/<sae>/autointerp.parquet (one row
    per judged feature: ``sae_id``, ``accuracy``, None when the judge's reply was unparsable).
    Raises ValueError when no feature has an accuracy.
    """
    table = {r["sae_id"]: r for r in pq.read_table(table_parquet).to_pylist()}
    scores: dict[str, list[float]] = {}
    for path in verdict_parquets:
        for r in pq.read_table(path).to_pylist():
            if r["accuracy"] is not None:
                scores.setdefault(r["sae_id"], []).append(r["accuracy"])
    if not scores:
        raise ValueError(
            "no feature was scored: every judge reply was unparsable "
            "(see results/saes/<sae>/autointerp.parquet and the autointerp logs)"
        )
    ids = sorted(scores, key=lambda s: (table[s]["group"], table[s].get("k") or 0, s))
    style = group_styles(table[s]["group"] for s in table)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(ids) + 2), 4.4), constrained_layout=True)
    rng = np.random.default_rng(0)
    for i, sid in enumerate(ids):
        st, vals = style[table[sid]["group"]], scores[sid]
        ax.bar(i, np.mean(vals), width=0.7, color=st["color"], alpha=0.35, label=table[sid]["group"])
        ax.scatter(i + rng.uniform(-0.2, 0.2, len(vals)), vals, s=12, color=st["color"], marker=st["marker"], zorder=3)
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    ax.text(len(ids) - 0.5, 0.51, "chance", color="grey", fontsize=8, ha="right", va="bottom")
    ax.set_xticks(range(len(ids)), ids, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("detection accuracy (held-out contexts)")
    ax.grid(axis="y", alpha=0.3)
    model = next(iter(table.values())).get("autointerp_model")
    finish(fig, [ax], f"Automated interpretability (judge: {model})", out_png)
