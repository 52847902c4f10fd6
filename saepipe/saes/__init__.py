"""SAE architectures of saepipe: TopK, Switch and Scale SAEs, registry and saved format.

Pure torch (+ safetensors); imports nothing from the rest of saepipe.
See :mod:`saepipe.saes.base` for units (``act_norm_factor``) and the training protocol.
"""

from .base import SAE, Encoding, SAEConfig, SAEOutput
from .registry import (
    ARCHITECTURES,
    build_sae,
    config_from_dict,
    load_config,
    load_sae,
    save_sae,
)
from .scale import ScaleConfig, ScaleSAE
from .switch import SwitchConfig, SwitchSAE
from .topk import TopKConfig, TopKSAE

__all__ = [
    "ARCHITECTURES",
    "Encoding",
    "SAE",
    "SAEConfig",
    "SAEOutput",
    "ScaleConfig",
    "ScaleSAE",
    "SwitchConfig",
    "SwitchSAE",
    "TopKConfig",
    "TopKSAE",
    "build_sae",
    "config_from_dict",
    "load_config",
    "load_sae",
    "save_sae",
]
