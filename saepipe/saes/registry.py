"""Architecture registry and the on-disk SAE format (SPEC §2).

``ARCHITECTURES`` maps a registry name to ``(SAE class, config class)``; adding an
architecture = one entry here. A saved SAE is a directory with

- ``sae.safetensors``: float32 tensors in the SPEC §2 names/shapes (normalised-space weights;
  see :mod:`saepipe.saes.base` for how ``act_norm_factor`` applies), and
- ``config.json``: ``cfg.to_dict()`` plus informational keys (``n_experts``,
  ``active_experts``, ``d_sae``, format tags), ``sort_keys=True, indent=2``.

Both files are written atomically (temp file in the same directory, then ``os.replace``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from .base import METADATA_KEYS, SAE, SAEConfig
from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .gated import GatedConfig, GatedSAE
from .jumprelu import JumpReLUConfig, JumpReLUSAE
from .relu import ReLUConfig, ReLUSAE
from .scale import ScaleConfig, ScaleSAE
from .switch import SwitchConfig, SwitchSAE
from .topk import TopKConfig, TopKSAE

ARCHITECTURES: dict[str, tuple[type[SAE], type[SAEConfig]]] = {
    "topk": (TopKSAE, TopKConfig),
    "switch": (SwitchSAE, SwitchConfig),
    "scale": (ScaleSAE, ScaleConfig),
    "relu": (ReLUSAE, ReLUConfig),
    "batchtopk": (BatchTopKSAE, BatchTopKConfig),
    "jumprelu": (JumpReLUSAE, JumpReLUConfig),
    "gated": (GatedSAE, GatedConfig),
}

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"


def _lookup(arch: Any) -> tuple[type[SAE], type[SAEConfig]]:
    try:
        return ARCHITECTURES[arch]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown SAE arch {arch!r}; known: {sorted(ARCHITECTURES)}"
        ) from None


def config_from_dict(d: dict[str, Any]) -> SAEConfig:
    """Config of the class registered for ``d["arch"]`` (unknown keys -> ``ValueError``)."""
    if "arch" not in d:
        raise ValueError(f"config dict has no 'arch' key; known archs: {sorted(ARCHITECTURES)}")
    return _lookup(d["arch"])[1].from_dict(d)


def build_sae(cfg: SAEConfig | dict[str, Any]) -> SAE:
    """Instantiate the SAE for a config object or dict (dispatch through ``ARCHITECTURES``)."""
    if isinstance(cfg, dict):
        cfg = config_from_dict(cfg)
    return _lookup(cfg.arch)[0](cfg)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_sae(sae: SAE, directory: str | os.PathLike, run: dict[str, Any] | None = None) -> Path:
    """Write ``sae.safetensors`` + ``config.json`` into ``directory`` (created); return it.

    ``run``: optional provenance (training settings, wall time, ...) stored under the
    ``"run"`` key of config.json; ignored by :func:`load_sae`.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous()
               for name, t in sae._saved_tensors().items()}
    config = {**sae.saved_metadata(), **sae.cfg.to_dict()}
    if run is not None:
        config["run"] = run
    text = json.dumps(config, sort_keys=True, indent=2) + "\n"

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    _atomic_write(out / CONFIG_FILE, write_json)
    return out


def load_config(directory: str | os.PathLike) -> SAEConfig:
    """Read ``config.json``, dropping informational keys that are not config fields."""
    with open(Path(directory) / CONFIG_FILE) as f:
        d = json.load(f)
    cfg_cls = _lookup(d.get("arch"))[1]
    fields = set(cfg_cls.field_names())
    return cfg_cls.from_dict({k: v for k, v in d.items() if k in fields or k not in METADATA_KEYS})


def load_sae(directory: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load a directory written by :func:`save_sae`; returns the SAE in eval mode on ``device``."""
    cfg = load_config(directory)
    sae = build_sae(cfg)
    sae._load_saved_tensors(load_file(str(Path(directory) / WEIGHTS_FILE)))
    return sae.to(device).eval()
