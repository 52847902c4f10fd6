"""GPU leases (saepipe/lease.py): one device per job, simulated devices (SAEPIPE_GPUS).

No GPU is needed: the lease only hands out device indices and sets CUDA_VISIBLE_DEVICES;
what is checked is that concurrent jobs never get the same index.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO, SNAKEMAKE
from leases import assert_no_shared_device

from saepipe.lease import gpu_lease, read_leases, try_lease

# A job that holds a lease for a while; its log (stderr) records what it got.
JOB = """
import sys, time
from saepipe.lease import gpu_lease
with gpu_lease():
    print("leased", flush=True)
    time.sleep(float(sys.argv[1]))
"""

SNAKEFILE = """
rule all:
    input: expand("done/{i}", i=range(6))

rule gpu_job:
    output: "done/{i}"
    log: "logs/{i}.log"
    resources: gpu=1
    shell: "{python} {job} 0.8 2> {log} && touch {output}"
"""


@pytest.fixture
def lease_env(tmp_path, monkeypatch):
    """Two simulated GPUs, a private lock dir, fast polling; returns the lock dir."""
    lock_dir = tmp_path / "locks"
    monkeypatch.setenv("SAEPIPE_GPUS", "2")
    monkeypatch.setenv("SAEPIPE_GPU_LOCK_DIR", str(lock_dir))
    monkeypatch.setenv("SAEPIPE_GPU_POLL_S", "0.05")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    lock_dir.mkdir()
    return lock_dir


def test_snakemake_jobs_each_get_their_own_gpu(tmp_path, lease_env):
    (tmp_path / "job.py").write_text(JOB)
    (tmp_path / "Snakefile").write_text(
        SNAKEFILE.replace("{python}", sys.executable).replace("{job}", str(tmp_path / "job.py"))
    )
    proc = subprocess.run(
        [SNAKEMAKE, "--cores", "4", "--resources", "gpu=2"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    leases = [lease for i in range(6) for lease in read_leases((tmp_path / f"logs/{i}.log").read_text())]
    assert len(leases) == 6 and {lease["source"] for lease in leases} == {"lease"}
    assert {lease["CUDA_VISIBLE_DEVICES"] for lease in leases} == {"0", "1"}  # both used
    assert_no_shared_device(leases)


def test_more_jobs_than_gpus_wait_for_a_free_one(tmp_path, lease_env):
    """Four jobs started at once on two devices: two wait, and say so in their logs."""
    (tmp_path / "job.py").write_text(JOB)
    logs = [tmp_path / f"{i}.log" for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "job.py"), "0.5"], stderr=log.open("w"), stdout=subprocess.DEVNULL
        )
        for log in logs
    ]
    assert [p.wait(timeout=30) for p in procs] == [0] * 4
    texts = [log.read_text() for log in logs]
    leases = [lease for text in texts for lease in read_leases(text)]
    assert len(leases) == 4 and {lease["CUDA_VISIBLE_DEVICES"] for lease in leases} == {"0", "1"}
    assert_no_shared_device(leases)
    assert sum("waiting for one to be released" in text for text in texts) >= 2


def test_inherited_cuda_visible_devices_is_used_as_is(lease_env, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # as Slurm would set it
    with gpu_lease() as lease:
        assert lease.source == "inherited" and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
        for index in (0, 1):  # no lock taken: both simulated devices are still free
            fd = try_lease(index, lease_env)
            assert fd is not None
            os.close(fd)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    [record] = read_leases(capsys.readouterr().err)
    assert record["source"] == "inherited" and record["CUDA_VISIBLE_DEVICES"] == "3"
    assert record["end"] >= record["start"]


def test_lease_sets_and_restores_cuda_visible_devices(lease_env):
    with gpu_lease() as first, gpu_lease(), gpu_lease() as third:  # the 2nd and 3rd inherit
        assert (first.source, first.gpu, third.source) == ("lease", 0, "inherited")
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0" and try_lease(0, lease_env) is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    fd = try_lease(0, lease_env)  # released on exit
    assert fd is not None
    os.close(fd)


def test_no_gpu_runs_on_cpu_without_a_lease(lease_env, monkeypatch, capsys):
    monkeypatch.setenv("SAEPIPE_GPUS", "0")
    with gpu_lease() as lease:
        assert lease.source == "cpu" and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert read_leases(capsys.readouterr().err)[0]["source"] == "cpu"
    assert not list(lease_env.iterdir())


def test_bad_gpu_count_is_a_clear_error(lease_env, monkeypatch):
    monkeypatch.setenv("SAEPIPE_GPUS", "two")
    with pytest.raises(ValueError, match="SAEPIPE_GPUS='two'"):
        with gpu_lease():
            pass


def test_killed_holder_frees_its_gpu(tmp_path, lease_env, monkeypatch):
    monkeypatch.setenv("SAEPIPE_GPUS", "1")
    (tmp_path / "job.py").write_text(JOB)
    holder = subprocess.Popen(
        [sys.executable, str(tmp_path / "job.py"), "60"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "leased"
        assert try_lease(0, lease_env) is None  # held by the other process
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    fd = try_lease(0, lease_env)
    assert fd is not None, "the kernel did not release the lock of a SIGKILLed holder"
    os.close(fd)


@pytest.mark.slow
def test_pipeline_gpu_jobs_log_their_device(micro_run):
    """Every GPU rule's job goes through the lease and logs what it got."""
    logs = {
        rule: sorted((micro_run / "results/logs").glob(pattern))
        for rule, pattern in {
            "extract": "extract/*.log",
            "train": "train/*.log",
            "evaluate": "evaluate/*.log",
            "lm_baseline": "lm_baseline.log",
            "maxact": "maxact/*.log",
        }.items()
    }
    for rule, paths in logs.items():
        assert paths, rule
        for path in paths:
            [record] = read_leases(path.read_text())
            assert record["source"] in {"cpu", "lease", "inherited"} and record["end"] is not None, path
    assert not read_leases((micro_run / "results/logs/lm.log").read_text())  # lm is CPU-only
