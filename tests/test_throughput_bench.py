"""bench/train_throughput.py runs end to end at its tiny preset and writes a consistent table
(structure and arithmetic only: no speed is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from saepipe.saes import ARCHITECTURES

REPO = Path(__file__).resolve().parents[1]


def test_tiny_preset_writes_a_consistent_table(tmp_path):
    cmd = [
        sys.executable,
        "bench/train_throughput.py",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--out-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (js,), (md,) = tmp_path.glob("train_throughput-*-cpu.json"), tmp_path.glob("train_throughput-*-cpu.md")
    result = json.loads(js.read_text())
    assert result["command"] == "python " + " ".join(cmd[1:-1] + [str(tmp_path)])
    names = [r["arch"] for r in result["rows"]]
    assert {n.split()[0] for n in names} == set(ARCHITECTURES) | {"dense_topk", "reference_switch"}
    assert "scale N=8 e=2" in names and "switch N=8" in names
    by = {r["arch"]: r for r in result["rows"]}
    assert by["dense_topk (reference)"]["ratio_to_dense_topk"] == 1.0
    peak = result["peak_tflops"] * 1e12
    for r in result["rows"]:
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / (r["ms_per_step"] / 1e3))
        assert r["pct_of_roofline"] == pytest.approx(100 * r["tokens_per_s"] * 3 * r["flops_per_token_fwd"] / peak)
        assert r["peak_mem_mb"] is not None
    # the references are charged their library twin's FLOPs (d=32, M=512, k=8; Switch N=8)
    assert by["dense_topk (reference)"]["flops_per_token_fwd"] == 2 * 32 * 512 + 2 * 32 * 8
    assert by["reference_switch (reference)"]["flops_per_token_fwd"] == 2 * 32 * 8 + 2 * 32 * 64 + 2 * 32 * 8
    loader = result["loader"]
    assert set(loader["tokens_per_s"]) == {"stream, prefetch 0", "stream, prefetch 1", "device cache"}
    fastest = max(r["tokens_per_s"] for r in result["rows"])
    assert loader["fastest_consumer_tokens_per_s"] == fastest
    assert all(
        loader["ratio_to_fastest_consumer"][m] == pytest.approx(v / fastest) for m, v in loader["tokens_per_s"].items()
    )
    text = md.read_text()
    assert f"`{result['command']}`" in text
    assert all(f"| {n} | cpu | 512 |" in text for n in names) and "| device cache |" in text
