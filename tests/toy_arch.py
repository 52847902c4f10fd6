"""A toy SAE architecture registered from outside saepipe (the plugin path; tests/test_toy_arch.py).

Everything a new architecture needs is in this one file: a config class that declares its
traits, an SAE class, and one ``register_architecture`` call. The pipeline finds it through
the config's ``plugins: [toy_arch]`` (this directory on PYTHONPATH).

The toy is a routed SAE without the router's gate: a Switch SAE (top-1 expert, TopK inside
it) whose decoder output is not scaled by the router probability (``heaviside`` on by
default), under its own name, label and sort order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from saepipe.saes import register_architecture
from saepipe.saes.switch import SwitchConfig, SwitchSAE


@dataclass
class ToyMoEConfig(SwitchConfig):
    """Switch's fields, with the ungated decode as the default."""

    heaviside: bool = True  # gate 1: the routed expert's latents are not scaled by p_i*

    ARCH: ClassVar[str] = "toymoe"
    LABEL: ClassVar[str] = "Toy MoE"
    ORDER: ClassVar[int] = 50  # after the built-in architectures
    # inherited traits: L0_FIXED (k fixes L0), ROUTED (router + experts), no omega, no threshold


class ToyMoESAE(SwitchSAE):
    """Switch's forward pass under the toy config."""

    cfg: ToyMoEConfig


register_architecture("toymoe", ToyMoESAE, ToyMoEConfig)
