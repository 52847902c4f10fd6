"""bench/gpu_check.sh: its CPU dry path runs every step (install check, micro sweep through
Snakemake, tiny benchmarks) and writes one JSON of the expected structure; a step that runs
out of time is killed with its processes and reported as such."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import MICRO_SAES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402

STEPS = ["install", "sweep", "train_throughput", "pack_throughput"]


def test_the_shell_script_parses():
    assert subprocess.run(["bash", "-n", "bench/gpu_check.sh"], cwd=REPO).returncode == 0
    help_text = subprocess.run(["bash", "bench/gpu_check.sh", "--help"], cwd=REPO, capture_output=True, text=True)
    assert help_text.returncode == 0 and "--cpu-dry" in help_text.stdout
    bad = subprocess.run(["bash", "bench/gpu_check.sh", "--nope"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument --nope" in bad.stderr


def test_a_step_past_its_timeout_is_killed_with_its_children(tmp_path):
    t0 = time.time()
    step = gpu_check.run_step(["bash", "-c", "sleep 60 & sleep 60; echo never"], 1, tmp_path / "log")
    assert step["timed_out"] and step["returncode"] != 0 and time.time() - t0 < 20
    assert "never" not in step["output"]


def test_steps_without_time_left_are_reported_not_started(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--cpu-dry", "--out-dir", str(tmp_path), "--budget-s", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    (js,) = tmp_path.glob("gpu_check-*-cpu-dry.json")
    report = json.loads(js.read_text())
    assert not report["ok"] and report["timed_out_steps"] == STEPS[1:]
    assert [f["step"] for f in report["failures"]] == STEPS[1:]
    assert all("not started" in report["steps"][s]["error"] for s in STEPS[1:])


@pytest.mark.slow
def test_cpu_dry_path_writes_one_complete_json(micro_copy, tmp_path):
    out = tmp_path / "out"
    # the sweep step on a copy of the suite's finished micro run (GPU_CHECK_WORKDIR): the script
    # runs snakemake there and checks every output, without training the micro sweep again
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_WORKDIR": str(micro_copy)}
    env.pop("GPU_CHECK_CPU_DRY", None)
    t0 = time.time()
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--cpu-dry", "--out-dir", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (js,) = out.glob("gpu_check-*-cpu-dry.json")
    report = json.loads(js.read_text())
    assert report["mode"] == "cpu-dry" and report["ok"] and report["failures"] == [] == report["timed_out_steps"]
    assert report["command"] == f"bash bench/gpu_check.sh --cpu-dry --out-dir {out}"
    assert report["budget_s"] == 900 and 0 < report["total_s"] <= time.time() - t0 + 1
    assert list(report["steps"]) == STEPS and all(s["ok"] for s in report["steps"].values())
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["cores"] == os.cpu_count()

    install = report["steps"]["install"]
    assert install["action"].startswith(f"skipped: {sys.executable} already has")

    sweep = report["steps"]["sweep"]
    assert "--resources" not in sweep["command"] and not sweep["timed_out"] and sweep["returncode"] == 0
    checks = sweep["checks"]
    assert checks["sweep_size"] == "existing" and checks["saes_expected"] == sorted(MICRO_SAES)
    assert checks["table_parquet"] and checks["table_rows"] == len(MICRO_SAES) and checks["saes_missing"] == []
    assert checks["sae_devices"] == {sae: "cpu" for sae in MICRO_SAES} and checks["all_on_cpu"]
    stages = sweep["stages"]
    assert stages["train"]["jobs"] == len(MICRO_SAES) == stages["evaluate"]["jobs"]  # train.pack 1: a job per SAE
    assert {"corpus", "lm", "extract", "train", "evaluate", "maxact", "aggregate"} <= set(stages)
    assert all(st["total_s"] >= st["max_s"] > 0 for st in stages.values())
    assert {lease["source"] for lease in sweep["train_leases"]} == {"cpu"}
    assert sorted(m for p in sweep["packs"].values() for m in p["members"]) == sorted(MICRO_SAES)

    for name in ("train_throughput", "pack_throughput"):
        step = report["steps"][name]
        assert step["timeout_s"] > 0 and "--preset tiny --device cpu" in step["command"]
        assert Path(step["file"]).parent == out and step["result"]["preset_name"] == "tiny"
        assert json.loads(Path(step["file"]).read_text()) == step["result"]
        assert Path(step["file"]).with_suffix(".md").is_file()
    assert report["steps"]["train_throughput"]["result"]["rows"]
    rows = report["steps"]["pack_throughput"]["result"]["rows"]
    assert [r["K"] for r in rows] == [1, 2, 4, 8]
    assert all(r["bytes_read_per_sae"] == rows[0]["bytes_read"] / r["K"] for r in rows)

    summary = report["summary"]
    assert summary["ok"] and set(summary["seconds"]) == set(STEPS) and summary["gpu"] is None
    assert [p["K"] for p in summary["pack"]] == [1, 2, 4, 8] and summary["train_tokens_per_s"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [js.name]
        + [Path(report["steps"][n]["file"]).name for n in ("train_throughput", "pack_throughput")]
        + [Path(report["steps"][n]["file"]).with_suffix(".md").name for n in ("train_throughput", "pack_throughput")]
    )


def test_the_offline_wheels_cover_every_import_of_the_check():
    """bench/gpu_wheels.py --plan (offline): every module gpu_check.sh's install step requires
    comes from a carried wheel or from the device image, no package is in two groups, and the
    carried versions are the lock's."""
    import importlib.metadata as md
    import re

    proc = subprocess.run([sys.executable, "bench/gpu_wheels.py", "--plan"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    groups = {g: {norm(n) for n in plan[g]} for g in ("carry", "image", "left_out")}
    assert not (groups["carry"] & groups["image"]) and not (groups["carry"] & groups["left_out"])
    assert {"snakemake", "transformer-lens", "zarr", "numcodecs", "datasets"} <= groups["carry"]
    assert {"torch", "numpy"} <= groups["image"] and groups["left_out"] == {"pulp", "wandb"}
    lock = dict(
        (norm(line.split("==")[0]), line.split("==")[1].strip())
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert all(lock[norm(n)] == v for n, v in plan["carry"].items())
    script = (REPO / "bench/gpu_check.sh").read_text()
    needed = re.search(r'need = "([^"]+)"', script).group(1).split()
    dists = md.packages_distributions()
    for module in needed:
        assert any(norm(d) in groups["carry"] | groups["image"] for d in dists[module]), module


def test_what_the_offline_wheels_leave_out_is_not_imported():
    """PuLP and wandb (36 MB) stay off the device machine: TransformerLens, Snakemake's
    scheduler and every saepipe stage the check runs import without them."""
    code = (
        "import sys\n"
        "sys.modules['wandb'] = sys.modules['pulp'] = None  # importing either now fails\n"
        "import transformer_lens, snakemake.api, snakemake.scheduling.milp\n"
        "import saepipe.train, saepipe.evaluate, saepipe.extract, saepipe.aggregate\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
