"""The micro pipeline on a real one-node Slurm cluster (tests/slurm/cluster.sh) with
profiles/slurm: every job goes through sbatch, GPU jobs get Slurm's CUDA_VISIBLE_DEVICES
(two fake GPUs), and the results equal those of the local run of the same config.

To stay within a few minutes on two cores (each Slurm job starts Snakemake twice: the
job and its srun step), it builds two of the micro sweep's SAEs (dense TopK and Switch)
up to their metrics: corpus, lm, 3 x extract, lm_baseline, 2 x train, 2 x evaluate.

Needs root (daemons, mknod) and Debian's Slurm packages, which cluster.sh installs with
apt-get when missing. In CI (CI=true) the test must run, so anything that stops it fails;
elsewhere it skips and says why. Deselect with `-m "not slurm"`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SNAKEMAKE, copy_workflow, micro_config
from leases import assert_no_shared_device

from saepipe.lease import read_leases

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CLUSTER = REPO / "tests/slurm/cluster.sh"
IN_CI = os.environ.get("CI", "").lower() == "true"
GPU_RULES = {"extract", "train", "lm_baseline", "evaluate"}
SAES = ["topk-k4", "switch_flop-k4"]  # a subset of conftest.MICRO_SAES: dense and MoE
TARGETS = [f"results/saes/{sae}/metrics.json" for sae in SAES]
TIMING = {"wall_time_s", "train_tokens_per_s", "train_wall_s_per_token"}  # the metrics that measure the machine


def cannot_run(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the Slurm test must run, not skip)")
    pytest.skip(reason)


def deep_merge(base: dict, site: dict) -> dict:
    """`base` with `site`'s values, mappings merged key by key (new dicts, inputs untouched)."""
    merged = dict(base)
    for key, value in site.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = deep_merge(base[key], value)
        else:
            merged[key] = value
    return merged


def write_test_profile(directory: Path) -> Path:
    """profiles/slurm filled in with the test cluster's values (tests/slurm/profile)."""
    base = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    site = yaml.safe_load((REPO / "tests/slurm/profile/config.yaml").read_text())
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(deep_merge(base, site), sort_keys=False))
    return directory


def run(cmd: list[str], env: dict, **kwargs) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, **kwargs).stdout


@pytest.fixture(scope="module")
def slurm_env():
    """Start the test cluster; yield the environment its clients need; always stop it."""
    if os.geteuid() != 0:
        cannot_run("starting Slurm daemons needs root")
    if not (shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists() or shutil.which("apt-get")):
        cannot_run("Slurm is not installed and there is no apt-get to install it")
    # Own short directory: socket paths stay short, and no pytest clean-up touches it.
    state = Path(tempfile.mkdtemp(prefix="saepipe-slurm-", dir="/tmp"))
    log = state / "cluster.log"
    try:
        started = time.time()
        with log.open("w") as out:
            try:
                failed = (
                    subprocess.run(
                        ["bash", str(CLUSTER), "start", str(state)], stdout=out, stderr=subprocess.STDOUT, timeout=480
                    ).returncode
                    != 0
                )
            except subprocess.TimeoutExpired:
                failed = True
        if failed:
            cannot_run(f"could not start the Slurm test cluster:\n{log.read_text()[-3000:]}")
        print(f"Slurm test cluster started in {time.time() - started:.1f}s")
        yield {
            **os.environ,
            "PATH": f"{state / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "SLURM_CONF": str(state / "etc/slurm.conf"),
        }
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], timeout=120)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_run(slurm_env, tmp_path_factory) -> Path:
    """The micro workflow run with --profile profiles/slurm (+ the test cluster's values)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("slurm-wf"), micro_config())
    profile = write_test_profile(workdir / "profiles/test-cluster")
    env = {**slurm_env, "PYTHONPATH": str(workdir)}
    started = time.time()
    try:
        proc = subprocess.run(
            [SNAKEMAKE, "--profile", str(profile), *TARGETS],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired as err:
        queue = subprocess.run(["squeue"], env=env, capture_output=True, text=True).stdout
        raise AssertionError(f"the Slurm run did not finish in {err.timeout}s; queue:\n{queue}") from err
    if proc.returncode != 0:
        slurm_logs = "".join(
            f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted((workdir / ".snakemake/slurm_logs").rglob("*.log"))[-3:]
        )
        raise AssertionError(f"snakemake --profile failed:\n{proc.stderr[-4000:]}\n{slurm_logs}")
    print(f"micro pipeline on Slurm: {time.time() - started:.1f}s")
    return workdir


def sacct_jobs(env: dict) -> list[dict[str, str]]:
    """Every job the test cluster ran (it is fresh: all of them are this test's)."""
    fields = ["JobID", "Partition", "State", "AllocTRES", "Comment"]
    out = run(["sacct", "-X", "-n", "-P", "-a", "-S", "2000-01-01", "-o", ",".join(fields)], env)
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]


def test_every_job_went_through_sbatch(slurm_run, slurm_env):
    jobs = sacct_jobs(slurm_env)
    by_rule: dict[str, list[dict]] = {}
    for job in jobs:
        assert job["Comment"].startswith("rule_"), job
        by_rule.setdefault(job["Comment"].removeprefix("rule_").split("_wildcards_")[0], []).append(job)
    assert {rule: len(js) for rule, js in by_rule.items()} == {
        "corpus": 1,
        "lm": 1,
        "extract": 3,
        "lm_baseline": 1,
        "train": len(SAES),
        "evaluate": len(SAES),
    }
    assert {job["State"] for job in jobs} == {"COMPLETED"}
    for rule, rule_jobs in by_rule.items():
        for job in rule_jobs:  # the profile's partitions and GPU requests reached sbatch
            gpu = rule in GPU_RULES
            assert job["Partition"] == ("gpu" if gpu else "debug"), job
            assert ("gres/gpu=1" in job["AllocTRES"]) == gpu, job


def test_gpu_jobs_use_slurms_devices(slurm_run):
    leases = []
    for rule in GPU_RULES:
        paths = sorted((slurm_run / "results/logs").glob(f"{rule}/*.log")) or [slurm_run / f"results/logs/{rule}.log"]
        for path in paths:
            [lease] = read_leases(path.read_text())
            assert lease["source"] == "inherited", (path, lease)  # Slurm's choice, no local lease
            leases.append(lease)
    assert {lease["CUDA_VISIBLE_DEVICES"] for lease in leases} == {"0", "1"}
    assert_no_shared_device(leases)


def test_results_equal_the_local_run(slurm_run, request):
    """Same config, same threads per job: bit-identical SAEs, identical metrics."""
    micro_run = request.getfixturevalue("micro_run")  # only once the cluster is up (no skip)
    for sae in SAES:
        weights = f"results/saes/{sae}/sae.safetensors"
        assert (slurm_run / weights).read_bytes() == (micro_run / weights).read_bytes(), sae
        slurm, local = (
            json.loads((wd / f"results/saes/{sae}/metrics.json").read_text()) for wd in (slurm_run, micro_run)
        )
        assert {k: v for k, v in slurm.items() if k not in TIMING} == {
            k: v for k, v in local.items() if k not in TIMING
        }, sae
