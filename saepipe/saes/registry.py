"""Architecture registry, architecture traits, plugins and the on-disk SAE format (docs/reference.md §2).

``ARCHITECTURES`` maps a registry name to ``(SAE class, config class)``. A new architecture
is one module with its config class (``SAEConfig`` subclass declaring its traits: ``LABEL``,
``ORDER``, ``L0_FIXED``, ``ROUTED``, ``HAS_OMEGA``, ``HAS_THRESHOLD``), its SAE class and one
call ``register_architecture(name, sae_cls, cfg_cls)``; the rest of saepipe reads the traits
(:func:`arch_traits`, the table's trait columns), never the name.

Plugins: an architecture outside saepipe lives in an importable module named in the config's
``plugins: [module, ...]``. The Snakefile imports them at parse time (:func:`load_plugins`)
and exports them as ``$SAEPIPE_PLUGINS`` (comma-separated module names); every process that
imports :mod:`saepipe.saes` (each job's script) imports the modules named there
(:func:`load_env_plugins`, run at the end of ``saepipe/saes/__init__.py``).

A saved SAE is a directory with

- ``sae.safetensors``: float32 tensors in the docs/reference.md §2 names/shapes (normalised-space weights;
  see :mod:`saepipe.saes.base` for how ``act_norm_factor`` applies), and
- ``config.json``: ``cfg.to_dict()`` plus informational keys (``n_experts``,
  ``active_experts``, ``d_sae``, format tags), ``sort_keys=True, indent=2``.

Both files are written atomically (temp file in the same directory, then ``os.replace``).
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .base import METADATA_KEYS, SAE, SAEConfig
from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .gated import GatedConfig, GatedSAE
from .jumprelu import JumpReLUConfig, JumpReLUSAE
from .matryoshka import MatryoshkaConfig, MatryoshkaSAE
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
    "matryoshka": (MatryoshkaSAE, MatryoshkaConfig),
}

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
PLUGINS_ENV = "SAEPIPE_PLUGINS"
"""Environment variable: comma-separated modules that register architectures (see module)."""

TRAIT_COLUMNS = ("arch_label", "arch_order", "l0_fixed", "routed", "has_omega", "has_threshold")
"""Keys of :func:`arch_traits` (and the results table's trait columns)."""


def register_architecture(name: str, sae_cls: type[SAE], cfg_cls: type[SAEConfig]) -> None:
    """Make ``name`` a valid ``arch``: :func:`build_sae`, :func:`load_sae`, the sweep and every
    stage then accept it. ``cfg_cls.ARCH`` must be ``name``; registering the same classes again
    (a re-imported plugin) is a no-op, other classes under a taken name are an error."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"architecture name must be an identifier-like string, got {name!r}")
    if not (isinstance(sae_cls, type) and issubclass(sae_cls, SAE)):
        raise TypeError(
            f"register_architecture({name!r}): sae_cls must be a subclass of saepipe.saes.SAE, got {sae_cls!r}"
        )
    if not (isinstance(cfg_cls, type) and issubclass(cfg_cls, SAEConfig)):
        raise TypeError(
            f"register_architecture({name!r}): cfg_cls must be a dataclass subclass "
            f"of saepipe.saes.SAEConfig, got {cfg_cls!r}"
        )
    if cfg_cls.ARCH != name:
        raise ValueError(
            f"register_architecture({name!r}): {cfg_cls.__name__}.ARCH is "
            f"{cfg_cls.ARCH!r}; set ARCH: ClassVar[str] = {name!r} in the config class"
        )
    known = ARCHITECTURES.get(name)
    if known is not None and known != (sae_cls, cfg_cls):
        raise ValueError(
            f"architecture {name!r} is already registered to {known[0].__name__}/"
            f"{known[1].__name__}; pick another name for {sae_cls.__name__}"
        )
    ARCHITECTURES[name] = (sae_cls, cfg_cls)


def arch_traits(arch: str) -> dict[str, Any]:
    """What the rest of saepipe knows of an architecture (keys: :data:`TRAIT_COLUMNS`):
    display label, sort order, whether k fixes L0 (else it is measured), whether a router
    picks experts, and whether it learns an omega gain / an activation threshold."""
    cfg_cls = _lookup(arch)[1]
    return {
        "arch_label": cfg_cls.LABEL or arch,
        "arch_order": cfg_cls.ORDER,
        "l0_fixed": cfg_cls.L0_FIXED,
        "routed": cfg_cls.ROUTED,
        "has_omega": cfg_cls.HAS_OMEGA,
        "has_threshold": cfg_cls.HAS_THRESHOLD,
    }


def load_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Import the modules that register architectures (each calls :func:`register_architecture`);
    an import error names the module and how to make it importable."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(
                f"cannot import the SAE plugin module {module!r} (config 'plugins' / "
                f"${PLUGINS_ENV}): {e}. Put its directory on PYTHONPATH (or install it), or "
                "remove it from 'plugins'."
            ) from e


def load_env_plugins() -> None:
    """:func:`load_plugins` for the modules named in ``$SAEPIPE_PLUGINS`` (comma-separated)."""
    load_plugins([m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()])


def _lookup(arch: Any) -> tuple[type[SAE], type[SAEConfig]]:
    try:
        return ARCHITECTURES[arch]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown SAE arch {arch!r}; known: {sorted(ARCHITECTURES)} (an architecture "
            "outside saepipe must be listed under the config's 'plugins')"
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
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in sae.saved_tensors().items()}
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
    sae.load_saved_tensors(load_file(str(Path(directory) / WEIGHTS_FILE)))
    return sae.to(device).eval()
