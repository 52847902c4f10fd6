"""SAELens 6.x plugin: classes for saepipe's routed SAEs, Switch and Scale.

SAELens has no mixture-of-experts SAE. Importing this module registers two architectures
with ``sae_lens.register_sae_class``, so ``SAE.load_from_disk`` / ``SAE.from_pretrained``
load the directories saepipe's export stage writes for them (results/export/saelens/<id>/)::

    import saepipe.interop.saelens  # or this file copied anywhere: it needs only torch and sae_lens
    #                               (saepipe in a SAELens env: pip install --no-deps, as its
    #                               transformer-lens 4 conflicts with SAELens' < 4)
    from sae_lens import SAE
    sae = SAE.load_from_disk("results/export/saelens/scale_flop-k4")

- ``saepipe_scale``: the Scale SAE (Xu et al. 2025) with its encoder feature scaling
  precomputed (the exported ``W_enc`` is the feature-scaled ``W_hat``, fixed after training).
- ``saepipe_switch``: the Switch SAE (Mudide et al. 2024): one expert per token.

One forward pass serves both (N experts of n = d_sae / N latents, expert i owns latents
``[i n, (i+1) n)``; raw activations, the normalisation is folded into the weights)::

    logits = (x - b_router) @ W_router + router_bias          # [..., N]
    S      = the active_experts experts of largest softmax(logits)
    w_i    = p_i (expert_weighting "prob")  |  softmax over the selected logits ("renorm_logits")
             | softmax over the selected probabilities ("code_softmax_of_probs")  |  1 ("one")
    pre    = (x - b_dec) @ W_enc + b_enc                        # [..., d_sae]
    after_topk:  keep the k largest pre among the latents of S; value = w_i * ReLU(pre)
    before_topk: keep the k largest w_i * pre among them;       value = ReLU(w_i * pre)
    x_hat  = values @ W_dec + b_dec

``encode`` returns the weighted values (what the decoder sums), so ``decode`` is SAELens'
usual linear decoder. Switch is the case of one expert, no ``b_enc`` and ``router_bias``
(exported as zeros) and ``w = p_{i*}`` (``"one"`` for its ``heaviside`` ablation). This module
encodes densely (every latent, then a mask to the selected experts): simple, not the sparse
routed computation saepipe trains with. It imports nothing from saepipe.
"""

# No `from __future__ import annotations`: the dataclasses below would then need this module in
# sys.modules, which importing the file by path (importlib's spec_from_file_location) skips.
import math
from dataclasses import dataclass

import torch
from sae_lens import SAE, SAEConfig, register_sae_class
from sae_lens.registry import get_sae_class
from torch import nn

EXPERT_WEIGHTINGS = ("prob", "renorm_logits", "code_softmax_of_probs", "one")
WEIGHT_ORDERS = ("after_topk", "before_topk")


@dataclass
class SaepipeScaleSAEConfig(SAEConfig):
    """A routed SAE: ``n_experts`` experts, ``active_experts`` routed per token, a TopK of ``k``
    over the routed experts' latents (module docstring)."""

    k: int = 1
    n_experts: int = 1
    active_experts: int = 1
    expert_weighting: str = "prob"
    weight_order: str = "after_topk"

    @classmethod
    def architecture(cls) -> str:
        return "saepipe_scale"

    def __post_init__(self) -> None:
        super().__post_init__()
        N, e = self.n_experts, self.active_experts
        if N < 1 or self.d_sae % N:
            raise ValueError(f"d_sae={self.d_sae} must be a multiple of n_experts={N} >= 1")
        if not 1 <= e <= N:
            raise ValueError(f"active_experts must be in [1, n_experts={N}], got {e}")
        if not 1 <= self.k <= e * (self.d_sae // N):
            raise ValueError(f"k={self.k} must be in [1, active_experts * d_sae / n_experts]")
        if self.expert_weighting not in EXPERT_WEIGHTINGS:
            raise ValueError(f"expert_weighting must be one of {EXPERT_WEIGHTINGS}, got {self.expert_weighting!r}")
        if self.weight_order not in WEIGHT_ORDERS:
            raise ValueError(f"weight_order must be one of {WEIGHT_ORDERS}, got {self.weight_order!r}")


@dataclass
class SaepipeSwitchSAEConfig(SaepipeScaleSAEConfig):
    """A Switch SAE: one expert per token."""

    @classmethod
    def architecture(cls) -> str:
        return "saepipe_switch"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.active_experts != 1:
            raise ValueError(f"a Switch SAE routes one expert per token, got active_experts={self.active_experts}")


def expert_weights(logits: torch.Tensor, active_experts: int, weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [..., N], selected [..., N] bool)``: each expert's weight on the token (0 where
    not selected) and the mask of the ``active_experts`` experts of largest probability."""
    probs = logits.softmax(dim=-1)
    p_sel, experts = probs.topk(active_experts, dim=-1, sorted=True)
    if weighting == "prob":
        w_sel = p_sel
    elif weighting == "renorm_logits":
        w_sel = logits.gather(-1, experts).softmax(dim=-1)
    elif weighting == "code_softmax_of_probs":
        w_sel = p_sel.softmax(dim=-1)
    else:  # "one"
        w_sel = torch.ones_like(p_sel)
    weight = torch.zeros_like(probs).scatter(-1, experts, w_sel)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, experts, True)
    return weight, selected


class SaepipeScaleSAE(SAE[SaepipeScaleSAEConfig]):
    """Inference-only routed SAE (module docstring): router, top-e experts, TopK, linear decoder."""

    b_enc: nn.Parameter
    W_router: nn.Parameter
    b_router: nn.Parameter
    router_bias: nn.Parameter

    def initialize_weights(self) -> None:
        super().initialize_weights()  # W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in]
        d, M, N = self.cfg.d_in, self.cfg.d_sae, self.cfg.n_experts

        def zeros(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=self.dtype, device=self.device))

        self.b_enc = zeros(M)
        self.W_router = zeros(d, N)
        self.b_router = zeros(d)
        self.router_bias = zeros(N)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted values of the k selected latents, dense ``[..., d_sae]`` (0 elsewhere)."""
        cfg = self.cfg
        # process_sae_in's steps, keeping the input before b_dec for the router
        x = self.run_time_activation_norm_fn_in(self.hook_sae_input(self.reshape_fn_in(x.to(self.dtype))))
        logits = (x - self.b_router) @ self.W_router + self.router_bias
        weight_N, selected_N = expert_weights(logits, cfg.active_experts, cfg.expert_weighting)
        n = cfg.d_sae // cfg.n_experts
        weight_M = weight_N.repeat_interleave(n, dim=-1)
        selected_M = selected_N.repeat_interleave(n, dim=-1)
        sae_in = x - self.b_dec * cfg.apply_b_dec_to_input
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        weighted = hidden_pre * weight_M
        key = weighted if cfg.weight_order == "before_topk" else hidden_pre
        idx = key.masked_fill(~selected_M, -math.inf).topk(cfg.k, dim=-1, sorted=False).indices
        acts = torch.zeros_like(hidden_pre).scatter(-1, idx, weighted.gather(-1, idx).relu())
        return self.hook_sae_acts_post(acts)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        sae_out_pre = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)
        return self.reshape_fn_out(sae_out_pre, self.d_head)

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """As SAELens' base, and the router's input side too."""
        super().fold_activation_norm_scaling_factor(scaling_factor)
        self.W_router.data *= scaling_factor
        self.b_router.data /= scaling_factor

    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError("folding decoder norms into a routed TopK SAE would change which latents it keeps")

    def fold_activation_whitening(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError("activation whitening cannot be folded into the router of a routed SAE")


class SaepipeSwitchSAE(SaepipeScaleSAE):
    """Inference-only Switch SAE (one expert per token)."""

    cfg: SaepipeSwitchSAEConfig


def _register(sae_cls: type[SAE], cfg_cls: type[SAEConfig]) -> None:
    """``register_sae_class``, a no-op when the name is taken (this file imported twice, e.g.
    as a module and by path)."""
    try:
        get_sae_class(cfg_cls.architecture())
    except KeyError:
        register_sae_class(cfg_cls.architecture(), sae_cls, cfg_cls)


_register(SaepipeScaleSAE, SaepipeScaleSAEConfig)
_register(SaepipeSwitchSAE, SaepipeSwitchSAEConfig)
