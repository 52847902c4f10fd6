"""bench/arch_speed.py runs end to end at its tiny preset and writes a consistent table, and
its interval and judgement helpers are right (structure and arithmetic only: no speed is
asserted)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from saepipe.saes import ARCHITECTURES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _common import median_ci, paired_ratio  # noqa: E402
from arch_speed import PARTIAL_DEAD, judge  # noqa: E402


def test_median_ci_is_the_sign_test_interval():
    # n = 20: P(Bin(20, 1/2) <= 5) = 0.0207 <= 0.025 < P(<= 6): the 6th and 15th values
    assert median_ci(list(range(1, 21))) == (10.5, 6, 15)
    assert median_ci([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)  # too few for 95%: the whole range
    rng = random.Random(0)
    covered = 0
    for _ in range(2000):
        _, lo, hi = median_ci([rng.gauss(0.0, 1.0) for _ in range(20)])
        covered += lo <= 0.0 <= hi
    assert 0.93 <= covered / 2000 <= 0.98  # 95.9% is the exact level at n = 20


def test_paired_ratio_pairs_rounds():
    med, lo, hi = paired_ratio([2.0, 4.0, 6.0, 8.0, 10.0, 12.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert (med, lo, hi) == (2.0, 2.0, 2.0)  # a slow moment hits both rows: the ratio holds
    with pytest.raises(ValueError, match="equal rounds"):
        paired_ratio([1.0], [1.0, 2.0])


@pytest.mark.parametrize("ci,verdict", [((1.1, 1.19), "met"), ((1.21, 1.3), "not met"), ((1.15, 1.25), "within noise")])
def test_judge(ci, verdict):
    assert judge(ci, 1.2) == verdict


def test_tiny_preset_writes_a_consistent_table(tmp_path):
    out = tmp_path / "speed.json"
    cmd = [sys.executable, "bench/arch_speed.py", "--preset", "tiny", "--device", "cpu", "--steps", "6"]
    cmd += ["--warmup", "1", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r["arch"]: r for r in json.loads(out.read_text())["rows"]}
    partial = {f"topk_auxk_{round(100 * f)}pct_dead" for f in PARTIAL_DEAD}
    assert set(rows) == set(ARCHITECTURES) | {"topk_auxk_all_dead", "dense_topk", "reference_switch"} | partial
    for name, r in rows.items():
        assert len(r["step_ms"]) == 6 and r["ms_per_step"] > 0
        assert r["target"] is None and r["judgement"] is None  # targets are the CPU preset's
        for of in ("dense_topk", "topk"):
            lo, hi = r[f"ratio_to_{of}_ci95"]
            assert 0 < lo <= hi, (name, of)
    assert rows["topk"]["ratio_to_topk"] == 1.0 and rows["topk"]["ratio_to_topk_ci95"] == [1.0, 1.0]
