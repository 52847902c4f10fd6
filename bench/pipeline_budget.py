"""Measure the pipeline's budgets from a clean clone (issue: set-up <= 15 min in all,
pipeline <= 10 min, no-op rerun <= 10 s, every job <= 4 GB peak memory).

    python bench/pipeline_budget.py [--out bench/results/pipeline_budget-DATE.json]

Steps, each timed: git clone of this repository's HEAD -> `make venv` (virtual environment
+ pinned install) -> `snakemake --cores all` -> the same again (no-op) -> report. Peak
memory per job comes from the Snakemake `benchmark:` files (max_rss, MB) under
results/benchmarks/. Figures only; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGETS = {"setup_s": None, "pipeline_s": 600, "noop_s": 10, "total_s": 900, "max_job_rss_mb": 4096}


def timed(cmd: list[str], cwd: Path, log: Path) -> float:
    t0 = time.time()
    with log.open("w") as f:
        subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.time() - t0


# One-thread fp32 matmul rate: the machine's speed at that moment. The 2-core machines here
# are shared and their speed drifts by a third between runs, so each run records it.
SPEED_PROBE = """
import time, torch
torch.set_num_threads(1)
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
a @ b
t0 = time.perf_counter()
for _ in range(40):
    a @ b
print(40 * 2 * 1024**3 / (time.perf_counter() - t0) / 1e9)
"""


def matmul_gflops(python: Path) -> float:
    return float(subprocess.run([str(python), "-c", SPEED_PROBE], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / f"bench/results/pipeline_budget-{dt.date.today()}.json")
    ap.add_argument("--keep", action="store_true", help="keep the clone (printed) for inspection")
    args = ap.parse_args()

    load_at_start = os.getloadavg()  # other work on the machine slows every figure below
    work = Path(tempfile.mkdtemp(prefix="saepipe-budget-"))
    clone = work / "saepipe"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env_bin = clone / ".venv/bin"
    res = {"setup_s": timed(["make", "venv"], clone, work / "setup.log")}
    speed_before = matmul_gflops(env_bin / "python")
    res["pipeline_s"] = timed([str(env_bin / "snakemake"), "--cores", "all"], clone, work / "pipeline.log")
    res["noop_s"] = timed([str(env_bin / "snakemake"), "--cores", "all"], clone, work / "noop.log")
    res["report_s"] = timed([str(env_bin / "snakemake"), "--report", "results/report.html"], clone, work / "report.log")
    res["total_s"] = res["setup_s"] + res["pipeline_s"] + res["report_s"]

    jobs = []
    for tsv in sorted((clone / "results/benchmarks").rglob("*.tsv")):
        row = next(csv.DictReader(tsv.open(), delimiter="\t"))
        jobs.append(
            {
                "job": str(tsv.relative_to(clone / "results/benchmarks")),
                "s": float(row["s"]),
                "max_rss_mb": float(row["max_rss"]),
            }
        )
    res["max_job_rss_mb"] = max(j["max_rss_mb"] for j in jobs)
    res["jobs"] = jobs
    res["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "matmul_gflops_1thread_before_after": [speed_before, matmul_gflops(env_bin / "python")],
    }
    res["date"] = dt.datetime.now().isoformat(timespec="seconds")
    res["budgets"] = BUDGETS

    print(f"{'measure':<16}{'value':>12}{'budget':>10}")
    for key in ("setup_s", "pipeline_s", "noop_s", "report_s", "total_s", "max_job_rss_mb"):
        budget = BUDGETS.get(key)
        print(f"{key:<16}{res[key]:>12.1f}{'' if budget is None else budget:>10}")
    print("\nslowest jobs:")
    for j in sorted(jobs, key=lambda j: -j["s"])[:8]:
        print(f"  {j['job']:<40}{j['s']:>8.1f} s{j['max_rss_mb']:>9.0f} MB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwritten {args.out}" + (f"; clone kept at {clone}" if args.keep else ""))
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
