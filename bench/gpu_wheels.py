"""Wheels for `bench/gpu_check.sh --wheels` on a GPU machine that reaches no package index.

    python bench/gpu_wheels.py            # here, where PyPI is reachable: fills .whl/
    python bench/gpu_wheels.py --plan     # only print what would be carried (offline)

The H200 machines lent to this project (the device tool's KINDS.md) run CPython 3.12 with a
CUDA PyTorch and a large scientific stack, and reach nothing outside: whatever saepipe needs
beyond that image has to travel with the working tree (64 MiB in all). This script walks
saepipe's runtime requirements (no extras) through the distributions installed here, which are
the lock (constraints.txt is their pip freeze), and keeps every package that the image does
not provide (IMAGE_PACKAGES), at its locked version:

- downloaded as a wheel for CPython 3.12 on manylinux x86_64 (``pip download --only-binary``);
  a pure-Python package published only as an sdist is built here into a py3-none-any wheel;
- LEFT_OUT are not carried: too large for the 64 MiB and not needed by the check (PuLP:
  Snakemake imports it lazily for its ILP scheduler and schedules greedily without it;
  wandb: TransformerLens imports it lazily in its training utilities, and `train.log_to` is
  off in the check).

Writes ``<out>/manifest.json`` (what was carried, what the image provides, what was left out,
the total size) and fails when the wheels exceed MAX_MIB. Then, with the device tool:
``run(command="bash bench/gpu_check.sh --wheels .whl --out-dir $OUT", carry=[".whl"],
timeout_s=600)`` (the JSON and the benchmarks' tables come back from $OUT); gpu_check.sh
installs exactly these wheels with ``--no-deps`` over the image's Python (a venv that sees
its packages) and records ``pip check``'s complaints in the JSON.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PYTHON = "3.12"
"""The device image's Python (KINDS.md: python3 is 3.12.3, /opt/torch/.venv/bin/python3)."""
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"] + [
    f"manylinux_2_{n}_x86_64" for n in range(5, 40)
]
MAX_MIB = 56
"""Wheels at most this large: the working tree (~3 MiB) and the wheels travel in 64 MiB."""

# The device image's Python packages (KINDS.md, "Python packages already there", read there on
# 2026-11-17; versions seen: torch 2.11.0, numpy 2.5.2, transformers 5.17.0, tokenizers 0.23.2,
# huggingface_hub 1.33.0, safetensors 0.8.0, accelerate 1.15.0: each within the ranges that the
# lock's packages require, e.g. transformers >= 5.9 and huggingface_hub >= 1.31 for
# transformer-lens 4.3 and datasets 5.2). Names as PyPI normalises them.
IMAGE_PACKAGES = frozenset(
    """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
    lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
    ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
    pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
    psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
    torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
    treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
    werkzeug wheel wrapt xarray xxhash yarl zipp
    """.split()
)
LEFT_OUT = {
    "pulp": "16 MB; Snakemake imports it lazily (ILP scheduler) and schedules greedily without it",
    "wandb": "20 MB; TransformerLens imports it lazily (training utilities); train.log_to is off",
}


def normalise(name: str) -> str:
    """PyPI's normal form of a distribution name (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(root: str = "saepipe", python: str = PYTHON) -> dict[str, tuple[str, str]]:
    """``{normal name: (name, installed version)}`` of every distribution that ``root``'s
    requirements (no extras) reach, with markers evaluated for Linux x86_64 and the image's
    Python; the requirements of the image's packages and of LEFT_OUT are not followed (the
    image is complete in itself). Raises when one is not installed here (make venv)."""
    env = {  # evaluate() fills in the rest from this machine
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "extra": "",
    }
    found: dict[str, tuple[str, str]] = {}
    todo = [(root, "")]
    while todo:
        name, parent = todo.pop()
        key = normalise(name)
        if key in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(
                f"gpu_wheels: {name} (needed by {parent or 'the request'}) is not installed here; run `make venv` first"
            ) from None
        found[key] = (dist.metadata["Name"], dist.version.split("+")[0])
        if key in IMAGE_PACKAGES or key in LEFT_OUT:
            continue
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(env):
                todo.append((req.name, key))
    del found[normalise(root)]
    return found


def plan(python: str = PYTHON) -> dict[str, dict[str, str]]:
    """``{"carry": {name: version}, "image": {...}, "left_out": {...}}`` of the closure."""
    out: dict[str, dict[str, str]] = {"carry": {}, "image": {}, "left_out": {}}
    for key, (name, version) in sorted(runtime_closure(python=python).items()):
        if key in LEFT_OUT:
            out["left_out"][name] = version
        elif key in IMAGE_PACKAGES:
            out["image"][name] = version
        else:
            out["carry"][name] = version
    return out


def fetch(specs: list[str], dest: Path, python: str = PYTHON) -> list[str]:
    """Download ``specs`` as manylinux wheels for that CPython into ``dest``; build the ones
    with no such wheel here (pure Python only). Returns what was built."""
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    pip = [sys.executable, "-m", "pip"]
    built = []
    for i, spec in enumerate(specs, 1):
        print(f"gpu_wheels: [{i}/{len(specs)}] {spec}", flush=True)
        got = subprocess.run(
            [
                *pip,
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                python,
                "--implementation",
                "cp",
                *platform_args,
                "-d",
                str(dest),
                spec,
            ],
            capture_output=True,
            text=True,
        )
        if got.returncode == 0:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            wheel = subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", tmp, spec], capture_output=True, text=True)
            made = list(Path(tmp).glob("*.whl"))
            if wheel.returncode or not made or not made[0].name.endswith("-py3-none-any.whl"):
                raise SystemExit(
                    f"gpu_wheels: no wheel of {spec} for CPython {python} on manylinux x86_64, "
                    f"and it is not pure Python:\n{got.stderr[-2000:]}{wheel.stderr[-2000:]}"
                )
            made[0].rename(dest / made[0].name)
            built.append(spec)
    return built


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / ".whl", help="wheel folder (default .whl, git-ignored)")
    ap.add_argument("--plan", action="store_true", help="print the plan as JSON and stop (offline)")
    ap.add_argument("--python", default=PYTHON, help=f"the target's CPython X.Y (default {PYTHON}, the image's)")
    args = ap.parse_args()
    p = plan(args.python)
    if args.plan:
        print(json.dumps(p, indent=2))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.whl"):
        old.unlink()
    built = fetch([f"{n}=={v}" for n, v in p["carry"].items()], args.out, args.python)
    wheels = sorted(args.out.glob("*.whl"))
    mib = sum(w.stat().st_size for w in wheels) / 2**20
    manifest = {
        "python": args.python,
        "wheels": [w.name for w in wheels],
        "built_from_sdist": built,
        "total_mib": round(mib, 1),
        **p,
        "left_out_why": LEFT_OUT,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(
        f"gpu_wheels: {len(wheels)} wheels, {mib:.1f} MiB in {args.out} ({len(p['image'])} packages from the image, "
        f"left out: {', '.join(p['left_out']) or 'none'})"
    )
    if mib > MAX_MIB:
        raise SystemExit(
            f"gpu_wheels: {mib:.1f} MiB is over {MAX_MIB} MiB: the working tree and the wheels travel "
            "in 64 MiB; leave out more (LEFT_OUT) or trust more of the image (IMAGE_PACKAGES)"
        )


if __name__ == "__main__":
    main()
