"""bench/pack_throughput.py runs end to end at its tiny preset and writes a consistent table
(structure and arithmetic only: no speed is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_tiny_pack_preset_writes_a_consistent_table(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "bench/pack_throughput.py", "--preset", "tiny", "--device", "cpu", "--threads", "1"]
    cmd += ["--tmp-dir", str(tmp_path), "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (js,), (md,) = out.glob("pack_throughput-*-cpu.json"), out.glob("pack_throughput-*-cpu.md")
    result = json.loads(js.read_text())
    assert result["command"] == "python " + " ".join(cmd[1:])
    assert result["date"][:10] in js.name
    assert {"platform", "cores", "torch", "gpu", "threads"} <= set(result["machine"])
    assert result["machine"]["gpu"] is None and result["precision"] == "fp32"
    assert result["train_config"]["device_cache_gb"] == 0.0  # the shards are really streamed
    p = result["preset"]
    assert (p["d"], p["M"], p["k"], p["batch"], p["tokens"]) == (32, 512, 8, 512, 8192)
    rows = result["rows"]
    assert [r["K"] for r in rows] == [1, 2, 4, 8]
    base = rows[0]
    # one epoch of 2 shards x 4096 tokens x d=32 in fp16, read once per pack whatever its K
    assert base["shard_bytes"] == 2 * 4096 * 32 * 2 == base["bytes_read"]
    for r in rows:
        K = r["K"]
        assert len(r["members"]) == K and len({m["lr"] for m in r["members"]}) == K
        assert all(m["k"] == 8 for m in r["members"])
        assert r["steps"] == 16 and r["tokens"] == 8192
        assert r["bytes_read"] == base["bytes_read"]
        assert r["bytes_read_per_sae"] == base["bytes_read"] / K  # exactly
        assert r["bytes_per_sae_vs_k1"] == pytest.approx(1 / K)
        assert 0 < r["loop_s"] <= r["wall_s"]
        assert r["tokens_per_s_per_sae"] == pytest.approx(r["tokens"] * K / r["wall_s"])
        assert r["loop_tokens_per_s_per_sae"] == pytest.approx(r["tokens"] * K / r["loop_s"])
        assert r["speedup_per_sae"] == pytest.approx(r["tokens_per_s_per_sae"] / base["tokens_per_s_per_sae"])
        assert r["peak_mem_mb"] is None
    assert base["speedup_per_sae"] == 1.0 and base["bytes_per_sae_vs_k1"] == 1.0
    text = md.read_text()
    assert f"`{result['command']}`" in text
    assert "| K | wall s | loop s | tokens/s per SAE | speed-up per SAE |" in text
    for r in rows:
        assert f"| {r['K']} | {r['wall_s']:.2f} | {r['loop_s']:.2f} | {r['tokens_per_s_per_sae']:,.0f} | " in text
        assert f"| {r['bytes_read']:,} | {r['bytes_read_per_sae']:,.0f} | {r['bytes_per_sae_vs_k1']:.3f} |" in text
    assert not list(tmp_path.glob("saepipe-pack-bench-*"))  # the shards and SAEs are cleaned up
