"""MoE figures (saepipe.plots.experts / redundancy / omega) on a synthetic sweep: dense, Switch and Scale SAEs."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saepipe.plots.experts import plot_expert_load, plot_expert_usage
from saepipe.plots.omega import plot_omega
from saepipe.plots.redundancy import plot_activation_similarity, plot_redundancy

N_EXPERTS = 8
BATCH = 1024
LOG_EVERY = 25


def _shares(rng, skew: float) -> np.ndarray:
    """Expert token shares; larger `skew` = less balanced."""
    s = np.exp(skew * rng.standard_normal(N_EXPERTS))
    return s / s.sum()


def _row(sae_id, group, arch, k, rng, *, n_experts=1, e=1, fs=None, l0=None, width=1024) -> dict:
    moe = n_experts > 1
    skew = 0.9 if arch == "switch" else 0.5 / e if moe else 0.0
    counts = rng.multinomial(131_072, _shares(rng, skew)).tolist() if moe else [131_072]
    p = np.array(counts) / sum(counts)
    ent = float(-(p[p > 0] * np.log(p[p > 0])).sum() / math.log(len(p))) if moe else 1.0
    red = (
        0.02
        + 0.002 * k
        + (0.05 if arch == "switch" else 0.0)
        - (0.01 * e if arch == "scale" else 0)
        + (0.015 if fs is False else 0.0)
    )
    sim = 0.02 + 0.0015 * k + (0.02 if fs is False else 0.0) + (0.03 if arch == "switch" else 0.0)
    omega = (list(rng.uniform(0.1, 0.6, n_experts) / e) if fs else [0.0] * n_experts) if arch == "scale" else None
    return {
        "sae_id": sae_id,
        "group": group,
        "arch": arch,
        "width": width,
        "k": k,
        "n_experts": n_experts,
        "active_experts": e if arch == "scale" else (1 if moe else None),
        "feature_scaling": fs,
        "l0": float(l0 if l0 is not None else k),
        "l2_per_token": 20.0 / k,
        "fvu": 0.3 / math.sqrt(k),
        "loss_recovered": 1 - 0.1 / k,
        "redundancy_09": max(red, 0.0),
        "redundancy_08": max(red, 0.0) * 2,
        "mean_max_cos": 0.5 + red,
        "activation_similarity": sim,
        "intra_expert_redundancy": red * 0.6 if moe else None,
        "inter_expert_redundancy": red * 1.1 if moe else None,
        "expert_counts": counts,
        "expert_cdf": np.cumsum(np.sort(p)[::-1]).tolist(),
        "expert_entropy_normalised": ent,
        "omega": omega,
        "flops_per_token": 2 * 128 * k * 8,
        "train_tokens_per_s": 5e4,
        "wall_time_s": 20.0,
    }


def _sweep(rng, dense_only: bool = False) -> list[dict]:
    rows = [_row(f"topk-k{k}", "topk", "topk", k, rng) for k in (8, 16, 32)]
    rows += [
        _row("batchtopk", "batchtopk", "batchtopk", 16, rng),
        _row("relu", "relu", "relu", 16, rng, l0=41.5),
        _row("jumprelu", "jumprelu", "jumprelu", 16, rng, l0=23.0),
        _row("gated", "gated", "gated", 8, rng, l0=12.3),
    ]
    if dense_only:
        return rows
    rows += [
        _row(f"switch_flop-k{k}", "switch_flop", "switch", k, rng, n_experts=N_EXPERTS, width=8192) for k in (8, 16, 32)
    ]
    rows += [
        _row(f"scale-k{k}-e{e}", "scale", "scale", k, rng, n_experts=N_EXPERTS, e=e, fs=True, width=4096)
        for k in (16, 32)
        for e in (1, 2, 4)
    ]
    rows += [
        _row(f"scale_nofs-k16-e{e}", "scale_nofs", "scale", 16, rng, n_experts=N_EXPERTS, e=e, fs=False, width=4096)
        for e in (1, 2, 4)
    ]
    return rows


def _log(path, row: dict, rng, steps: int = 40) -> None:
    """train_log.jsonl: routing collapses early then balances; omega grows from 0."""
    moe = row["n_experts"] > 1
    base = _shares(rng, 1.2)
    omega_final = np.array(row["omega"]) if row["omega"] is not None else None
    lines = []
    for i in range(steps):
        step = i * LOG_EVERY
        t = step / (LOG_EVERY * steps)
        rec = {
            "step": step,
            "tokens": (step + 1) * BATCH,
            "lr": 1e-3,
            "mse": 0.5 * math.exp(-3 * t) + 0.05,
            "l0": float(row["k"]),
            "dead_fraction": 0.1 * t,
            "tokens_per_s": 5e4,
            "elapsed_s": 0.05 * step,
        }
        rec["loss"] = rec["mse"]
        if moe:
            mix = math.exp(-5 * t)
            shares = mix * base + (1 - mix) / N_EXPERTS
            counts = rng.multinomial(BATCH, shares)
            f = counts / BATCH
            rec["balance"] = float(3.0 * N_EXPERTS * (f * shares).sum())
            rec["loss"] += rec["balance"]
            rec["expert_counts"] = counts.tolist()
        if omega_final is not None:
            noise = 0.01 * rng.standard_normal(N_EXPERTS)
            rec["omega"] = (
                (omega_final * (1 - math.exp(-4 * t)) + noise).tolist() if row["feature_scaling"] else [0.0] * N_EXPERTS
            )
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")


def make_results(root, dense_only: bool = False, drop: tuple[str, ...] = ()) -> tuple[str, dict]:
    """A synthetic results/ tree: table.parquet (columns in `drop` removed) + train logs."""
    rng = np.random.default_rng(0)
    rows = _sweep(rng, dense_only)
    logs = {}
    for r in rows:
        d = root / "saes" / r["sae_id"]
        d.mkdir(parents=True)
        _log(d / "train_log.jsonl", r, rng)
        logs[r["sae_id"]] = str(d / "train_log.jsonl")
    table = root / "table.parquet"
    pq.write_table(pa.Table.from_pylist([{c: v for c, v in r.items() if c not in drop} for r in rows]), table)
    return str(table), logs


def assert_png(path) -> None:
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 10_000, (path, len(data))


def test_all_moe_figures(tmp_path):
    table, logs = make_results(tmp_path)
    out = tmp_path / "plots"
    out.mkdir()
    plot_expert_usage(table, str(out / "expert_usage.png"))
    plot_expert_load(logs, str(out / "expert_load.png"))
    plot_redundancy(table, str(out / "redundancy.png"))
    plot_omega(table, logs, str(out / "omega.png"))
    plot_activation_similarity(table, str(out / "activation_similarity.png"))
    for name in ("expert_usage", "expert_load", "redundancy", "omega", "activation_similarity"):
        assert_png(out / f"{name}.png")
    assert sorted(p.name for p in out.iterdir()) == sorted(  # atomic write: no temp files left
        f"{n}.png" for n in ("expert_usage", "expert_load", "redundancy", "omega", "activation_similarity")
    )


def test_dense_only_sweep(tmp_path):
    table, logs = make_results(tmp_path, dense_only=True)
    with pytest.raises(ValueError, match="no MoE SAE"):
        plot_expert_usage(table, str(tmp_path / "u.png"))
    with pytest.raises(ValueError, match="expert_counts' or 'balance'"):
        plot_expert_load(logs, str(tmp_path / "l.png"))
    with pytest.raises(ValueError, match="no Scale SAE with feature scaling on"):
        plot_omega(table, logs, str(tmp_path / "o.png"))
    assert not list(tmp_path.glob("*.png"))
    # redundancy vs k and activation similarity apply to dense SAEs too (MoE panels omitted)
    plot_redundancy(table, str(tmp_path / "r.png"))
    plot_activation_similarity(table, str(tmp_path / "s.png"))
    assert_png(tmp_path / "r.png")
    assert_png(tmp_path / "s.png")


def test_older_table_and_logs(tmp_path):
    """A table without the routing/geometry columns and logs with only the balance term."""
    new = (
        "redundancy_09",
        "redundancy_08",
        "mean_max_cos",
        "intra_expert_redundancy",
        "inter_expert_redundancy",
        "activation_similarity",
        "expert_counts",
        "expert_cdf",
        "expert_entropy_normalised",
        "omega",
    )
    table, logs = make_results(tmp_path, drop=new)
    for path in logs.values():
        rows = [json.loads(x) for x in open(path).read().splitlines()]
        for r in rows:
            r.pop("expert_counts", None)
            r.pop("omega", None)
        open(path, "w").write("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match="no routing statistics"):
        plot_expert_usage(table, str(tmp_path / "u.png"))
    with pytest.raises(ValueError, match="redundancy_09"):
        plot_redundancy(table, str(tmp_path / "r.png"))
    with pytest.raises(ValueError, match="omega column missing"):
        plot_omega(table, logs, str(tmp_path / "o.png"))
    with pytest.raises(ValueError, match="activation_similarity"):
        plot_activation_similarity(table, str(tmp_path / "s.png"))
    plot_expert_load(logs, str(tmp_path / "l.png"))  # balance-loss panel only
    assert_png(tmp_path / "l.png")


def test_partial_data(tmp_path):
    """Omega only in the logs, counts without a CDF, one Scale e value: panels adapt."""
    table, logs = make_results(tmp_path, drop=("omega", "expert_cdf", "expert_entropy_normalised"))
    rows = [
        r
        for r in pq.read_table(table).to_pylist()
        if r["arch"] != "scale" or (r["active_experts"] == 2 and r["feature_scaling"])
    ]
    pq.write_table(pa.Table.from_pylist(rows), table)
    plot_expert_usage(table, str(tmp_path / "u.png"))
    plot_redundancy(table, str(tmp_path / "r.png"))
    plot_omega(table, {k: v for k, v in logs.items() if k.startswith("scale-")}, str(tmp_path / "o.png"))
    plot_activation_similarity(table, str(tmp_path / "s.png"))
    for n in "uros":
        assert_png(tmp_path / f"{n}.png")
