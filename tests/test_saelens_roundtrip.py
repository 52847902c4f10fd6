"""Round trip through the real SAELens: every SAE of the micro pipeline run, exported
(saepipe/interop/export.py), loads with ``sae_lens.SAE.load_from_disk`` (the routed ones after
importing the plugin saepipe/interop/saelens.py by path) and encodes and decodes held-out
activations as saepipe does: the same active latents (L0 per token identical), reconstruction
and latent values within 1e-5 of the activation scale.

SAELens 6.54 needs transformer-lens < 4, so it runs in its own virtual environment,
``.venv-saelens`` at the repository root (git-ignored), built on first use (python -m venv,
torch first, then sae-lens constrained to that torch) and rebuilt when the versions its
marker file records differ from the ones below. Without network access the test is skipped,
unless CI is set: then a venv that cannot be built is a failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MICRO_SAES, REPO
from safetensors.torch import load_file

from saepipe.data.shards import read_shard
from saepipe.interop import export
from saepipe.saes import load_sae

SAELENS_VERSION = export.SAELENS_VERSION  # "6.54.12"
TORCH_VERSION = "2.13.0"
VENV = REPO / ".venv-saelens"
MARKER = VENV / "saepipe-versions.json"
PLUGIN = REPO / "saepipe/interop/saelens.py"
N_TOKENS = 2048
TOLERANCE = 1e-5  # max abs difference, relative to the activation scale (RMS of the inputs)

pytestmark = pytest.mark.slow

# Runs in the SAELens venv: load every exported SAE (dense ones before the plugin is imported),
# encode and decode the held-out activations, save what came out.
SIDE_SCRIPT = r"""
import importlib.util, json, sys
from pathlib import Path
import numpy as np, torch
from safetensors.torch import load_file, save_file
import sae_lens
from sae_lens import SAE

plugin, x_path, out_dir, *dirs = sys.argv[1:]
x = torch.from_numpy(np.load(x_path))
routed = lambda d: json.loads((Path(d) / "cfg.json").read_text())["architecture"].startswith("saepipe_")
report = {"sae_lens": sae_lens.__version__, "torch": torch.__version__, "saes": {}}
loaded_plugin = False
for d in sorted(dirs, key=routed):  # dense SAEs first: they need no plugin
    if routed(d) and not loaded_plugin:
        spec = importlib.util.spec_from_file_location("saepipe_saelens_plugin", plugin)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        loaded_plugin = True
    sae = SAE.load_from_disk(d)
    with torch.no_grad():
        acts = sae.encode(x)
        recon = sae.decode(acts)
        forward = sae(x)
    name = Path(d).name
    save_file({"acts": acts.contiguous(), "recon": recon.contiguous(), "forward": forward.contiguous()},
              str(Path(out_dir) / f"{name}.safetensors"))
    sparsity = load_file(str(Path(d) / "sparsity.safetensors"))["sparsity"]
    report["saes"][name] = {"class": type(sae).__name__, "architecture": sae.cfg.architecture(),
                            "d_sae": sae.cfg.d_sae, "sparsity_shape": list(sparsity.shape),
                            "hook_name": sae.cfg.metadata.hook_name}
print(json.dumps(report))
"""


def _wanted() -> dict[str, str]:
    return {
        "sae-lens": SAELENS_VERSION,
        "torch": TORCH_VERSION,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _cached() -> bool:
    try:
        recorded = json.loads(MARKER.read_text())
    except (OSError, ValueError):
        return False
    return _venv_python().exists() and all(recorded.get(k) == v for k, v in _wanted().items())


def _run(cmd: list, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)


def _registry_reachable(python: Path, tmp: Path) -> bool:
    """Whether pip can fetch sae-lens from the package index (one small download, no deps)."""
    proc = _run([python, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, f"sae-lens=={SAELENS_VERSION}"], 300)
    return proc.returncode == 0


def _build() -> float:
    """(Re)build the SAELens venv; returns the seconds it took. Raises RuntimeError on failure."""
    start = time.time()
    shutil.rmtree(VENV, ignore_errors=True)
    steps = [[sys.executable, "-m", "venv", VENV]]
    pip = [_venv_python(), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    constraints = VENV / "constraints.txt"
    steps += [pip + [f"torch=={TORCH_VERSION}"], pip + ["-c", constraints, f"sae-lens=={SAELENS_VERSION}"]]
    for i, cmd in enumerate(steps):
        proc = _run(cmd)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        if i == 0:
            constraints.write_text(f"torch=={TORCH_VERSION}\n")
    seconds = time.time() - start
    MARKER.write_text(json.dumps({**_wanted(), "build_seconds": round(seconds, 1)}, indent=2) + "\n")
    return seconds


@contextlib.contextmanager
def _lock():
    """One builder at a time (parallel pytest sessions share the venv)."""
    with open(REPO / ".venv-saelens.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prebuild() -> None:
    """Build the venv if it is missing, in the background from collection on (conftest's
    pytest_collection_finish): pip downloads while other tests run. A failure is left to the
    fixture, which rebuilds and reports it."""
    try:
        with _lock():
            if not _cached():
                _build()
    except Exception:
        pass


@pytest.fixture(scope="session")
def saelens_python(tmp_path_factory) -> Path:
    """The SAELens venv's python, built if missing or stale (see the module docstring)."""
    with _lock():
        if _cached():
            return _venv_python()
        try:
            seconds = _build()
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            shutil.rmtree(VENV, ignore_errors=True)
            if os.environ.get("CI"):
                pytest.fail(f"cannot build the SAELens venv (CI is set):\n{e}")
            if not _registry_reachable(Path(sys.executable), tmp_path_factory.mktemp("pip")):
                pytest.skip(f"pip cannot reach the package index for sae-lens=={SAELENS_VERSION} (and CI is not set)")
            raise
        print(f"built {VENV} in {seconds:.0f} s", file=sys.stderr)
    return _venv_python()


def held_out_activations(run: Path, n: int = N_TOKENS) -> np.ndarray:
    """The first `n` kept tokens of the run's eval shards (never trained on), float32."""
    shards = sorted((run / "results/activations/eval").glob("*.zarr"))
    return np.concatenate([read_shard(p).kept_acts() for p in shards])[:n].astype(np.float32)


def ours(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """saepipe's latent values as the decoder sums them (Switch: times its gate), dense, and
    its reconstruction, for raw `x`."""
    with torch.no_grad():
        enc = sae.encode(x)
        acts = enc.acts_BK if enc.gate_B is None else enc.acts_BK * enc.gate_B[:, None]
        dense = torch.zeros(len(x), sae.cfg.width).scatter_add(1, enc.idx_BK, acts)
        return dense, sae.decode(enc)


def test_saelens_loads_every_exported_sae(micro_run, saelens_python, tmp_path):
    eval_shards = sorted(str(p) for p in (micro_run / "results/activations/eval").glob("*.zarr"))
    saes = micro_run / "results/saes"
    exported = {}
    for sid in sorted(MICRO_SAES):
        exported[sid] = export.export_saelens(
            saes / sid, eval_shards, tmp_path / "export" / sid, saes / sid / "metrics.json", device="cpu"
        )
        # the pipeline's export stage wrote the same files (config: export.saelens, default true)
        in_run = micro_run / "results/export/saelens" / sid
        if in_run.exists():
            for name in (export.CFG_FILE, export.WEIGHTS_FILE, export.SPARSITY_FILE):
                assert (in_run / name).read_bytes() == (exported[sid] / name).read_bytes(), (sid, name)
    x_np = held_out_activations(micro_run)
    np.save(tmp_path / "x.npy", x_np)
    out = tmp_path / "saelens_out"
    out.mkdir()
    script = tmp_path / "side.py"
    script.write_text(SIDE_SCRIPT)
    start = time.time()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SAEPIPE_PLUGINS")}
    proc = subprocess.run(
        [str(saelens_python), str(script), str(PLUGIN), str(tmp_path / "x.npy"), str(out)]
        + [str(d) for d in exported.values()],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"SAELens {report['sae_lens']} (torch {report['torch']}): {time.time() - start:.1f} s", file=sys.stderr)
    assert report["sae_lens"] == SAELENS_VERSION and set(report["saes"]) == MICRO_SAES

    x = torch.from_numpy(x_np)
    scale = float(x.pow(2).mean().sqrt())  # activation scale: RMS of the raw inputs
    failures, rows = [], []
    for sid in exported:
        sae = load_sae(saes / sid)
        info = report["saes"][sid]
        assert info["architecture"] == type(sae.cfg).SAELENS_ARCH and info["d_sae"] == sae.cfg.width
        assert info["sparsity_shape"] == [sae.cfg.width] and info["hook_name"] == sae.cfg.hook
        theirs = load_file(out / f"{sid}.safetensors")
        acts, recon = ours(sae, x)
        l0_ours, l0_theirs = (acts > 0).sum(-1), (theirs["acts"] > 0).sum(-1)
        recon_diff = float((recon - theirs["recon"]).abs().max()) / scale
        acts_diff = float((acts - theirs["acts"]).abs().max()) / scale
        fwd_diff = float((theirs["forward"] - theirs["recon"]).abs().max()) / scale
        rows.append(
            f"{sid:16s} {info['class']:18s} L0 {l0_ours.float().mean():6.2f} "
            f"recon {recon_diff:.1e} acts {acts_diff:.1e} (x scale {scale:.3g})"
        )
        if not torch.equal(l0_ours, l0_theirs) or not torch.equal(acts > 0, theirs["acts"] > 0):
            n_bad = int((l0_ours != l0_theirs).sum())
            failures.append(f"{sid}: L0 differs on {n_bad} of {len(x)} tokens or the active latents differ")
        if max(recon_diff, acts_diff, fwd_diff) > TOLERANCE:
            failures.append(f"{sid}: max difference recon {recon_diff:.2e}, acts {acts_diff:.2e} x scale")
    print("\n".join(rows), file=sys.stderr)
    assert not failures, "\n".join(failures + rows)
