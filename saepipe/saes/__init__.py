"""SAE architectures of saepipe: ReLU, TopK, BatchTopK, JumpReLU, Gated, Switch and Scale SAEs,
registry and saved format.

Pure torch (+ safetensors); imports nothing from the rest of saepipe.
New architectures: one module + one ``register_architecture`` call (:mod:`.registry`).
See :mod:`saepipe.saes.base` for units (``act_norm_factor``) and the training protocol, and
:mod:`saepipe.saes.moe` for what the routed SAEs (Switch, Scale) share: the balance loss in the
papers' units (``alpha_units``) and AuxK over the whole dictionary.
"""

from .base import SAE, Encoding, SAEConfig, SAEOutput
from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .gated import GatedConfig, GatedSAE
from .jumprelu import JumpReLUConfig, JumpReLUSAE
from .moe import MoEConfig, MoESAE
from .registry import (
    ARCHITECTURES,
    arch_traits,
    build_sae,
    config_from_dict,
    load_config,
    load_env_plugins,
    load_plugins,
    load_sae,
    register_architecture,
    save_sae,
)
from .relu import ReLUConfig, ReLUSAE
from .scale import ScaleConfig, ScaleSAE
from .switch import SwitchConfig, SwitchSAE
from .topk import TopKConfig, TopKSAE

__all__ = [
    "BatchTopKConfig",
    "BatchTopKSAE",
    "GatedConfig",
    "GatedSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "MoEConfig",
    "MoESAE",
    "ReLUConfig",
    "ReLUSAE",
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
    "arch_traits",
    "build_sae",
    "config_from_dict",
    "load_config",
    "load_env_plugins",
    "load_plugins",
    "load_sae",
    "register_architecture",
    "save_sae",
]

# Architectures registered by plugin modules named in $SAEPIPE_PLUGINS (set by the Snakefile
# from the config's `plugins`): imported last, so they can import anything above.
load_env_plugins()
