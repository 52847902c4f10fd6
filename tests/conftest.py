"""Shared fixtures: a micro copy of the workflow that runs end to end in about a minute."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_PARTS = [
    "Snakefile",
    "config.yaml",
    "rules",
    "workflow_scripts",
    "schemas",
    "report",
    "saepipe",
    "profiles",
    "envs",
]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def micro_config() -> dict:
    """config.yaml shrunk to seconds of work; same structure, so schema changes show up."""
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["corpus"].update(packages=[], vocab_size=512, seq_len=64, min_tokens=50_000)
    cfg["lm"].update(d_model=32, n_layers=2, n_heads=2, d_mlp=64, steps=20, batch_size=16, warmup_steps=2)
    cfg["extract"].update(
        hook="blocks.1.hook_resid_pre", train_tokens=16_384, eval_tokens=4_096, shard_tokens=8_192, batch_size=64
    )
    # one SAE per train job (pack 1): tests/test_packs.py turns packs on
    cfg["train"].update(tokens=16_384, batch_size=256, warmup_steps=5, log_every=10, pack=1)
    cfg["sweep"] = {
        "topk": {"arch": "topk", "width": 128, "k": [4, 8], "dead_tokens": 4096},
        "switch_flop": {"arch": "switch", "n_experts": 4, "k": [4], "match": {"baseline": "topk", "by": "flops"}},
        "switch_width": {"arch": "switch", "n_experts": 4, "k": [4], "match": {"baseline": "topk", "by": "width"}},
        "scale_flop": {
            "arch": "scale",
            "n_experts": 4,
            "active_experts": 2,
            "k": [4],
            "match": {"baseline": "topk", "by": "flops"},
        },
        "batchtopk": {"arch": "batchtopk", "width": 128, "k": 4, "dead_tokens": 4096},
        "relu": {"arch": "relu", "width": 128, "k": 16, "l1_coeff": 3.0},
        "jumprelu": {"arch": "jumprelu", "width": 128, "k": 16, "threshold_init": 0.1},
        "gated": {"arch": "gated", "width": 128, "k": 8, "l1_coeff": 5.0},
    }
    cfg["evaluate"].update(ce_tokens=2_048, ce_batch_size=16, batch_size=1024, similarity_tokens=512)
    cfg["maxact"].update(
        features=8, top_examples=5, random_examples=4, negative_examples=4, tokens=4_096, batch_size=1024
    )
    return cfg


MICRO_SAES = {
    "topk-k4",
    "topk-k8",
    "switch_flop-k4",
    "switch_width-k4",
    "scale_flop-k4",
    "batchtopk",
    "relu",
    "jumprelu",
    "gated",
}


def copy_workflow(dest: Path, config: dict | None = None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / part)
    if config is not None:
        write_config(dest, config)
    return dest


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def snakemake(
    workdir: Path, *args: str, check: bool = True, pythonpath: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess:
    """Run snakemake in `workdir` with its saepipe (plus `pythonpath`, searched first)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (*pythonpath, workdir)))}
    proc = subprocess.run([SNAKEMAKE, *args], cwd=workdir, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> Path:
    """The micro workflow after one complete run (shared by the pipeline tests: do not modify)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("micro"), micro_config())
    snakemake(workdir, "--cores", "2")
    return workdir


TESTS = Path(__file__).resolve().parent


def pytest_collection_finish(session) -> None:
    """Start slow, mostly download-bound set-up in the background as soon as the tests are
    known: the SAELens venv of tests/test_saelens_roundtrip.py (its fixture waits for it)."""
    for item in session.items:
        prebuild = getattr(getattr(item, "module", None), "prebuild", None)
        if prebuild is not None:
            threading.Thread(target=prebuild, name=f"prebuild {item.module.__name__}", daemon=True).start()
            return


def toy_plugins_config() -> dict:
    """The micro config with one training shard, TopK and the toy architecture (k = 4 each),
    and both toy plugins: tests/toy_arch.py (an architecture) and tests/toy_figure.py (a figure)."""
    cfg = micro_config()
    cfg["plugins"] = ["toy_arch", "toy_figure"]
    cfg["corpus"].update(min_tokens=30_000)
    cfg["extract"].update(train_tokens=8_192)
    cfg["train"].update(tokens=8_192)
    cfg["sweep"] = {
        "topk": {"arch": "topk", "width": 128, "k": 4, "dead_tokens": 4096},
        "toy": {"arch": "toymoe", "width": 128, "n_experts": 4, "k": 4, "dead_tokens": 4096},
    }
    return cfg


@pytest.fixture(scope="session")
def toy_plugins_run(tmp_path_factory) -> Path:
    """The toy-plugin workflow after one complete run and its report (report.html), shared by
    tests/test_toy_arch.py and tests/test_toy_figure.py: do not modify."""
    workdir = copy_workflow(tmp_path_factory.mktemp("toy"), toy_plugins_config())
    snakemake(workdir, "--cores", "2", pythonpath=(TESTS,))
    snakemake(workdir, "--report", "report.html", pythonpath=(TESTS,))
    return workdir


@pytest.fixture
def micro_copy(micro_run, tmp_path) -> Path:
    """A private copy of the completed micro run (results and Snakemake metadata included)."""
    dest = tmp_path / "wf"
    shutil.copytree(micro_run, dest, symlinks=True)
    return dest


def random_shards(root: Path, n_shards: int, rows: int, d: int = 16, seed: int = 0) -> list[str]:
    """`n_shards` activation shards of `rows` N(0, 1) rows each (fp16, d = `d`) under `root`."""
    import numpy as np

    from saepipe.data.shards import write_shard

    rng, paths = np.random.default_rng(seed), []
    for i in range(n_shards):
        acts = rng.standard_normal((rows, d)).astype(np.float16)
        norm = float(np.linalg.norm(acts.astype(np.float32), axis=1).mean())
        meta = {"model": "m", "hook": "h", "dtype": "float16", "d_in": d, "token_count": rows, "mean_norm": norm}
        write_shard(root / f"{i}.zarr", acts, np.zeros(rows, np.int32), np.arange(rows, dtype=np.int32), meta)
        paths.append(str(root / f"{i}.zarr"))
    return paths


@pytest.fixture(scope="module")
def one_thread():
    """Tiny torch ops: one thread avoids OpenMP thrashing on a busy 2-core machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
