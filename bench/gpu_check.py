"""The steps of bench/gpu_check.sh after the install: the micro sweep through Snakemake, the
training and pack benchmarks, and ONE JSON with every figure and failure.

    bash bench/gpu_check.sh              # on a GPU machine (installs first when needed)
    bash bench/gpu_check.sh --cpu-dry    # the same steps on the CPU, tiny presets (CI)

Run by the shell script, with the install step's outcome on the command line; it can also be
run by itself (``python bench/gpu_check.py [--cpu-dry] --out-dir DIR``), then the install
step is reported as not run. Steps (each in its own process group, with its own timeout,
shortened so that the later steps keep at least their reserve before --deadline):

1. sweep: a temp copy of the workflow with the test suite's micro config
   (tests/conftest.py ``micro_config`` + ``copy_workflow``) and every stage's ``device``
   set to cuda (``--cpu-dry``: cpu), run by ``snakemake --cores all --resources gpu=1``
   (``--cpu-dry``: no gpu resource, SAEPIPE_GPUS=0). Checked: results/table.parquet exists,
   every SAE of the micro sweep has a config.json whose run.device is cuda (cpu). Reported:
   seconds, per-stage job timings from the Snakemake benchmark files, the GPU leases of the
   train jobs, the pack manifests.
2. train_throughput: ``bench/train_throughput.py --preset h200`` with 10 timed steps after 3
   (``--cpu-dry``: tiny on the CPU).
3. pack_throughput: ``bench/pack_throughput.py --preset h200`` (``--cpu-dry``: tiny on the CPU).

Writes ``<out dir>/gpu_check-<date>.json`` (``--cpu-dry``: ``gpu_check-<date>-cpu-dry.json``;
the benchmarks' own .json/.md land beside it) and exits 1 if any step failed or ran out of
time (each failure is in the JSON's ``failures`` with its error text).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = {"gpu": 480, "cpu-dry": 900}
"""The whole check, install included: 8 minutes on the GPU machine; the CPU dry path's micro
sweep alone takes 2 to 5 minutes on a shared 2-core machine."""
STEPS = {
    # step: (timeout cap in seconds, reserve kept for it while earlier steps run)
    # GPU: the sweep's ~40 gpu=1 jobs run one at a time (process start, imports, CUDA init each)
    "gpu": {"sweep": (300, 60), "train_throughput": (70, 50), "pack_throughput": (100, 60)},
    "cpu-dry": {"sweep": (720, 60), "train_throughput": (120, 30), "pack_throughput": (120, 30)},
}
BENCH_ARGS = {
    "gpu": {
        "train_throughput": ["--preset", "h200", "--device", "cuda", "--steps", "10", "--warmup", "3"],
        "pack_throughput": ["--preset", "h200", "--device", "cuda"],
    },
    "cpu-dry": {
        "train_throughput": ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--threads", "1"],
        "pack_throughput": ["--preset", "tiny", "--device", "cpu", "--threads", "1"],
    },
}
TAIL = 4000
"""Characters of output kept for a failed step."""

ENV_PROBE = r"""
import json, platform, os
out = {"python": platform.python_version(), "executable": __import__("sys").executable}
try:
    import torch
    out.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if out["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_count=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                   gpu_memory_gib=round(p.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
except Exception as err:
    out["error"] = f"{type(err).__name__}: {err}"
from importlib.metadata import PackageNotFoundError, version
for name in ("snakemake", "zarr", "numpy", "transformer-lens", "triton"):
    try:
        out[name] = version(name)
    except PackageNotFoundError:
        out[name] = None
print(json.dumps(out))
"""


def tail(text: str, n: int = TAIL) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def last_error(text: str) -> str:
    """The output's last line that names an error (else its last line): a failure in one line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "ERROR" in line or "Exception" in line]
    return (errors or lines or [""])[-1][:500]


def run_step(cmd: list[str], timeout: float, log: Path, cwd: Path = REPO, env: dict | None = None) -> dict:
    """Run `cmd` in its own process group with stdout+stderr to `log`; on timeout SIGTERM the
    group (SIGKILL 15 s later). Returns returncode, seconds, timed_out and the output's tail."""
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return {
        "command": " ".join(map(str, cmd)),
        "returncode": proc.returncode,
        "seconds": round(time.time() - t0, 2),
        "timeout_s": round(timeout, 1),
        "timed_out": timed_out,
        "output": log.read_text(errors="replace"),
    }


def import_conftest():
    """tests/conftest.py's module (micro_config, copy_workflow, MICRO_SAES); a stand-in for
    pytest when it is not installed (conftest only uses its fixture decorator)."""
    try:
        import pytest  # noqa: F401
    except ImportError:

        def fixture(*args, **kwargs):
            return args[0] if args and callable(args[0]) else (lambda f: f)

        sys.modules["pytest"] = types.SimpleNamespace(fixture=fixture)  # type: ignore[assignment]
    sys.path.insert(0, str(REPO / "tests"))
    import conftest

    return conftest


def stage_timings(results: Path) -> dict:
    """Per stage (rule): jobs, total and slowest seconds, largest max RSS (MB), from the
    Snakemake benchmark files results/benchmarks/<rule>/*.tsv and results/benchmarks/<rule>.tsv."""
    stages: dict[str, dict] = {}
    root = results / "benchmarks"
    for tsv in sorted(root.rglob("*.tsv")):
        rel = tsv.relative_to(root)
        stage = (
            rel.parts[0] if len(rel.parts) > 1 else rel.stem.split("_")[0] if rel.stem.startswith("plot_") else rel.stem
        )
        try:
            row = next(csv.DictReader(tsv.open(), delimiter="\t"))
            s, rss = float(row["s"]), float(row["max_rss"]) if row.get("max_rss") not in (None, "", "NA") else None
        except (StopIteration, KeyError, ValueError):
            continue
        st = stages.setdefault(stage, {"jobs": 0, "total_s": 0.0, "max_s": 0.0, "max_rss_mb": None})
        st["jobs"] += 1
        st["total_s"] = round(st["total_s"] + s, 2)
        st["max_s"] = round(max(st["max_s"], s), 2)
        if rss is not None:
            st["max_rss_mb"] = round(max(st["max_rss_mb"] or 0.0, rss), 1)
    return stages


def failed_job_logs(workdir: Path, limit: int = 3) -> dict:
    """Tails of the job logs that hold a Python traceback (a failed job's error text)."""
    out = {}
    for log in sorted((workdir / "results/logs").rglob("*.log")):
        text = log.read_text(errors="replace")
        if "Traceback" in text or "Error" in text:
            out[str(log.relative_to(workdir))] = tail(text, 2000)
            if len(out) >= limit:
                break
    return out


def sweep_config(conftest, device: str) -> tuple[dict, str]:
    """The micro config with every stage on `device`."""
    cfg = conftest.micro_config()
    for section in cfg.values():
        if isinstance(section, dict) and "device" in section:
            section["device"] = device
    return cfg, "micro"


def sweep_step(mode: str, timeout: float, work: Path) -> dict:
    conftest = import_conftest()
    device = "cpu" if mode == "cpu-dry" else "cuda"
    existing = os.environ.get("GPU_CHECK_WORKDIR")
    if existing:  # a finished workflow (CI: the test suite's micro run): checked, and rerun only if stale
        import yaml

        workdir = Path(existing)
        cfg = yaml.safe_load((workdir / "config.yaml").read_text())
        size = "existing"
    else:
        cfg, size = sweep_config(conftest, device)
        workdir = conftest.copy_workflow(work / "workflow", cfg)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(os.cpu_count() or 1)]
    if mode == "cpu-dry":
        env["SAEPIPE_GPUS"] = "0"  # no GPU lease: every job on the CPU
    else:
        cmd += ["--resources", "gpu=1"]
    step = run_step(cmd, timeout, work / "snakemake.log", cwd=workdir, env=env)
    results = workdir / "results"
    saes = {}
    for config in sorted(results.glob("saes/*/config.json")):
        run = json.loads(config.read_text()).get("run", {})
        saes[config.parent.name] = run.get("device")
    from saepipe.sweep import expand_sweep

    expected = sorted(expand_sweep(cfg, d_in=cfg["lm"]["d_model"]))
    table = results / "table.parquet"
    checks = {
        "sweep_size": size,
        "table_parquet": table.is_file(),
        "saes_expected": expected,
        "saes_missing": sorted(set(expected) - set(saes)),
        "sae_devices": saes,
        "all_on_" + device: bool(saes) and all(str(d).startswith(device) for d in saes.values()),
    }
    if table.is_file():
        try:
            import pyarrow.parquet as pq

            checks["table_rows"] = pq.read_metadata(table).num_rows
        except Exception as err:  # the check is the file; its row count is a bonus
            checks["table_rows"] = f"unreadable: {type(err).__name__}: {err}"
    leases = []
    try:
        from saepipe.lease import read_leases

        for log in sorted(results.glob("logs/train/*.log")):
            leases += [{"job": log.stem, **lease} for lease in read_leases(log.read_text(errors="replace"))]
    except Exception as err:
        leases.append({"error": f"{type(err).__name__}: {err}"})
    packs = {}
    for manifest in sorted(results.glob("packs/*/pack.json")):
        m = json.loads(manifest.read_text())
        packs[m["pack"]] = {k: m.get(k) for k in ("members", "steps", "bytes_read", "shard_bytes", "wall_time_s")}
    problems = []
    if step["returncode"] != 0:
        problems.append(f"snakemake exited {step['returncode']}")
    if not checks["table_parquet"]:
        problems.append("results/table.parquet is missing")
    if checks["saes_missing"]:
        problems.append(f"SAEs without config.json: {checks['saes_missing']}")
    wrong = {s: d for s, d in saes.items() if not str(d).startswith(device)}
    if wrong:
        problems.append(f"SAEs not trained on {device}: {wrong}")
    output = step.pop("output")
    step.update(
        ok=not problems and not step["timed_out"],
        device=device,
        checks=checks,
        stages=stage_timings(results),
        train_leases=leases,
        packs=packs,
    )
    if step["timed_out"]:
        problems.insert(0, f"killed at its {step['timeout_s']:.0f} s timeout")
    if problems:
        step["failed_job_logs"] = failed_job_logs(workdir)
        first = next(iter(step["failed_job_logs"].items()), None)
        if first:
            problems.append(f"first failed job {first[0]}: {last_error(first[1])}")
        step["error"] = "; ".join(problems)
        step["output_tail"] = tail(output)
    return step


def bench_step(name: str, mode: str, timeout: float, out_dir: Path, work: Path) -> dict:
    t0 = time.time()
    cmd = [sys.executable, f"bench/{name}.py", *BENCH_ARGS[mode][name], "--out-dir", str(out_dir)]
    step = run_step(cmd, timeout, work / f"{name}.log")
    device = "cpu" if mode == "cpu-dry" else "cuda"
    written = [p for p in out_dir.glob(f"{name}-*-{device}.json") if p.stat().st_mtime >= t0 - 1]
    output = step.pop("output")
    if step["returncode"] == 0 and written:
        step["file"] = str(max(written, key=lambda p: p.stat().st_mtime))
        step["result"] = json.loads(Path(step["file"]).read_text())
        step["ok"] = True
    else:
        step["ok"] = False
        if step["timed_out"]:
            step["error"] = f"killed at its {step['timeout_s']:.0f} s timeout"
        elif step["returncode"]:
            step["error"] = f"exit {step['returncode']}: {last_error(output)}"
        else:
            step["error"] = f"no {name}-*-{device}.json written"
        step["output_tail"] = tail(output)
    return step


def environment() -> dict:
    """Python, torch, CUDA, GPU (probed in a fresh process) and the machine."""
    probe = subprocess.run([sys.executable, "-c", ENV_PROBE], capture_output=True, text=True, timeout=120)
    try:
        env = json.loads(probe.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        env = {"error": tail(probe.stderr, 2000)}
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        env["nvidia_smi"] = smi.stdout.strip() if smi.returncode == 0 else f"failed: {tail(smi.stderr, 500)}"
    env.update(
        platform=platform.platform(),
        cores=os.cpu_count(),
        hostname=platform.node(),
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry", action="store_true", help="the same steps on the CPU at the tiny presets")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench/results")
    ap.add_argument("--budget-s", type=float, help="the whole check's time budget (s; default 480, --cpu-dry 900)")
    ap.add_argument("--deadline", type=float, help="unix time by which all is done (default: now + --budget-s)")
    ap.add_argument("--command", help="the command line to record (the shell script's)")
    ap.add_argument("--install", type=Path, help="JSON file with the install step's outcome (from gpu_check.sh)")
    ap.add_argument("--only", nargs="+", choices=list(STEPS["gpu"]), help="run only these steps")
    ap.add_argument("--keep", action="store_true", help="keep the workflow copy and the step logs (printed)")
    args = ap.parse_args(argv)
    mode = "cpu-dry" if args.cpu_dry else "gpu"
    args.budget_s = args.budget_s or BUDGET_S[mode]
    t_start = time.time()
    deadline = args.deadline or t_start + args.budget_s
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"gpu_check-{dt.date.today()}{'-cpu-dry' if args.cpu_dry else ''}.json"
    report: dict = {
        "mode": mode,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": args.command or "python " + " ".join(["bench/gpu_check.py", *(argv or sys.argv[1:])]),
        "budget_s": args.budget_s,
        "ok": False,
        "steps": {},
        "failures": [],
        "timed_out_steps": [],
    }
    if args.install and args.install.is_file():
        report["steps"]["install"] = json.loads(args.install.read_text())
    else:
        report["steps"]["install"] = {"ok": True, "action": "not run (gpu_check.py called directly)", "seconds": 0}
    work = Path(tempfile.mkdtemp(prefix="saepipe-gpu-check-"))
    steps = [s for s in STEPS[mode] if not args.only or s in args.only]
    try:
        report["environment"] = environment()
        for i, name in enumerate(steps):
            cap = STEPS[mode][name][0]
            reserve = sum(STEPS[mode][later][1] for later in steps[i + 1 :])
            timeout = min(cap, deadline - time.time() - reserve)
            print(f"gpu_check: {name} (timeout {timeout:.0f} s) ...", flush=True)
            if timeout < 5:
                step = {"ok": False, "timed_out": True, "seconds": 0, "timeout_s": round(timeout, 1)}
                step["error"] = "not started: the check's time budget was spent by the steps before"
            else:
                try:
                    if name == "sweep":
                        step = sweep_step(mode, timeout, work)
                    else:
                        step = bench_step(name, mode, timeout, out_dir, work)
                except Exception as err:
                    step = {"ok": False, "timed_out": False, "error": f"{type(err).__name__}: {err}"}
                    step["traceback"] = tail(traceback.format_exc())
            report["steps"][name] = step
            print(
                f"gpu_check: {name} {'ok' if step['ok'] else 'FAILED'} in {step.get('seconds', 0):.0f} s"
                + (" (ran out of time)" if step.get("timed_out") else "")
                + ("" if step["ok"] else f": {step.get('error', '')}"),
                flush=True,
            )
    except Exception as err:  # the JSON is written whatever happened
        report["failures"].append({"step": "gpu_check.py", "error": f"{type(err).__name__}: {err}"})
        report["traceback"] = tail(traceback.format_exc())
    finally:
        env = report.get("environment", {})
        cuda = f"torch.cuda.is_available() is {env.get('cuda_available')} {env.get('error', '')}".strip()
        env_error = f"no CUDA device for torch {env.get('torch')} ({env.get('executable')}): {cuda}"
        for name, step in report["steps"].items():
            if not step.get("ok"):
                report["failures"].append({"step": name, "error": step.get("error", "failed")})
            if name == "install" and mode == "gpu" and not env.get("cuda_available"):
                report["failures"].append({"step": "environment", "error": env_error})
            if step.get("timed_out"):
                report["timed_out_steps"].append(name)
        report["ok"] = not report["failures"] and all(s in report["steps"] for s in steps)
        report["total_s"] = round(time.time() - t_start + report["steps"]["install"].get("seconds", 0), 1)
        report["summary"] = summary(report)
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")
        if args.keep:
            print(f"gpu_check: workflow and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report["summary"], indent=1))
    print(f"gpu_check: {'all steps ok' if report['ok'] else 'FAILED: ' + str(report['failures'])}")
    print(f"gpu_check: written {out}")
    return 0 if report["ok"] else 1


def summary(report: dict) -> dict:
    """The headline figures, also printed: seconds per step, the env, throughput tables."""
    env = report.get("environment", {})
    out: dict = {
        "ok": report["ok"],
        "seconds": {name: s.get("seconds") for name, s in report["steps"].items()},
        "torch": env.get("torch"),
        "cuda": env.get("cuda"),
        "gpu": env.get("gpu"),
    }
    sweep = report["steps"].get("sweep", {})
    if "stages" in sweep:
        out["sweep_stage_s"] = {k: v["total_s"] for k, v in sweep["stages"].items()}
    tt = report["steps"].get("train_throughput", {}).get("result")
    if tt:
        out["train_tokens_per_s"] = {r["arch"]: round(r["tokens_per_s"]) for r in tt["rows"]}
    pt = report["steps"].get("pack_throughput", {}).get("result")
    if pt:
        out["pack"] = [
            {
                "K": r["K"],
                "tokens_per_s_per_sae": round(r["tokens_per_s_per_sae"]),
                "speedup_per_sae": round(r["speedup_per_sae"], 3),
                "bytes_read_per_sae": r["bytes_read_per_sae"],
            }
            for r in pt["rows"]
        ]
    return out


if __name__ == "__main__":
    sys.exit(main())
