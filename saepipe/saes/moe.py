"""Shared parts of the routed (mixture-of-experts) SAEs: Switch (:mod:`.switch`) and Scale
(:mod:`.scale`).

N experts of n = M / N latents; expert i owns the global latents ``[i n, (i+1) n)``. Both
archs share the config fields of :class:`MoEConfig`, the pre-router bias ``b_router`` (set to
the geometric median of the first batch, like ``b_dec``), and two loss terms:

``balance`` (load balancing, both papers' eq. 2.2)::

    balance = c * N * sum_i f_i P_i
    f_i = fraction of the batch's tokens whose top-1 (argmax) expert is i   (no gradient)
    P_i = mean router probability of expert i
    c   = alpha * act_norm_factor**2   (alpha_units = "paper", default)
        = alpha                        (alpha_units = "normalised")

Why ``act_norm_factor**2``: the papers minimise ``||x - x_hat||^2 / d + alpha * L_lb`` on RAW
activations, while this project's ``mse`` term is computed on ``x_n = f x``
(``f = act_norm_factor``), i.e. it is the raw term times ``f**2``. With ``c = alpha f**2``
the whole normalised loss is ``f**2`` times the papers' objective, so ``alpha`` means the
papers' alpha (``alpha = 3`` is their default). ``"normalised"`` keeps ``alpha`` relative to
the normalised reconstruction (E||x_n|| ~ sqrt(d)), which is scale-free across models but is
the papers' ``alpha * (E||x_raw||)^2 / d`` (about 8x for GPT-2 layer 8, docs/reference.md §5).

``auxk`` (Gao et al. 2024 AuxK, docs/reference.md §1, §5; training mode only, ``auxk=True``): latents that
have not fired for more than ``dead_tokens`` tokens are dead. Their pre-activations are
computed over the WHOLE dictionary, regardless of routing (the arch's ``_dead_encoder``:
Switch ``W_enc`` columns, no bias; Scale feature-scaled ``W_hat`` columns + ``b_enc``), on
``x_n - b_dec``. Only the dead columns are gathered (one ``[B, d] x [d, n_dead]`` matmul with
the sparse TopK backward of :func:`kernels.topk_linear`); the top-``min(k_aux, n_dead)`` per
token (by pre-activation) reconstruct the detached residual ``e = x_n - x_hat_n`` without
``b_dec``, and the term is ``aux_coeff * sum||e - e_hat||^2 / sum||e - mean_b(e)||^2``
(:func:`kernels.auxk_loss`); 0 when nothing is dead. Neither paper uses AuxK
(``auxk=False`` reproduces them); the reference code's AuxK has sign/normalisation quirks
that make it nearly inert and is not implemented.

Expert weight in the AuxK decode (``auxk_expert_weight``, default True)::

    e_hat = sum_j w_{i(j)}(x) ReLU(pre_j) W_dec[j]      (w detached; i(j) = expert of latent j)

with ``w_i(x)`` the weight expert i gets on token x when routed: Switch ``p_i`` (1 with
``heaviside``), Scale its ``expert_weighting`` formula extended to every expert (exactly
``w_i`` for the selected ones). Why: in the main path a latent's contribution is
``w_i * act``, so the live latents' pre-activations are ~``1 / w`` (~N for Switch) times
the feature magnitude; dead latents trained by an unweighted AuxK learn pre-activations
~``w`` times too small and never win the routed TopK. Measured (tests/test_moe_fairness.py
setting: d=32, M=256, N=4, half the latents poisoned dead, 300 steps): dead fraction
0.50 -> 0.00 for Switch and Scale with the weight; 0.50 -> ~0.50 with
``auxk_expert_weight=False`` (as with AuxK off), while the unweighted form does revive when
the weight is 1 (Switch ``heaviside``: 0.50 -> 0.02). ``False`` gives the unweighted form
(Gao's TopK form taken literally).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from . import kernels
from .base import SAE, AuxKConfigMixin, Encoding, SAEConfig

ALPHA_UNITS = ("paper", "normalised")


@dataclass
class MoEConfig(AuxKConfigMixin, SAEConfig):
    """Fields shared by the routed SAEs (not registered as an arch on its own)."""

    n_experts: int = 8  # N experts; expert i owns latents [i * M/N, (i+1) * M/N)
    alpha: float = 3.0  # load-balancing coefficient, in the units of `alpha_units`
    # "paper": balance = alpha * act_norm_factor**2 * N sum f_i P_i (alpha = the papers' alpha,
    # defined on RAW activations); "normalised": alpha * N sum f_i P_i (scale-free)
    alpha_units: str = "paper"
    auxk: bool = True  # Gao's AuxK over the whole dictionary's dead latents (off = the papers)
    # AuxK decode scales each dead latent by its expert's (detached) weight on the token, as
    # the main path does; False = unweighted (inert when weights << 1, see module docstring)
    auxk_expert_weight: bool = True
    k_aux: int | None = None  # dead latents used by AuxK per token; None -> d_in // 2
    aux_coeff: float = 1 / 32  # AuxK loss coefficient
    dead_tokens: int = 10_000_000  # tokens without firing after which a latent is dead

    ROUTED: ClassVar[bool] = True  # trait: a router picks experts per token

    def __post_init__(self) -> None:
        super().__post_init__()
        N = self.n_experts
        if not isinstance(N, int) or isinstance(N, bool) or N <= 0:
            raise ValueError(f"n_experts must be a positive int, got {N!r}")
        if self.width % N:
            raise ValueError(f"width={self.width} must be divisible by n_experts={N}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha!r}")
        if self.alpha_units not in ALPHA_UNITS:
            raise ValueError(
                f"alpha_units must be one of {list(ALPHA_UNITS)} ('paper': alpha is the papers' "
                f"coefficient on raw activations; 'normalised': on the normalised loss), got "
                f"{self.alpha_units!r}"
            )
        self._validate_auxk()
        if not isinstance(self.auxk_expert_weight, bool):
            raise ValueError(f"auxk_expert_weight must be a bool, got {self.auxk_expert_weight!r}")

    @property
    def expert_count(self) -> int:
        """N = ``n_experts``."""
        return self.n_experts

    @property
    def expert_width(self) -> int:
        """n = width // n_experts latents per expert."""
        return self.width // self.n_experts

    @property
    def balance_coeff(self) -> float:
        """Coefficient ``c`` of ``N sum f_i P_i`` in the normalised loss (see module docstring)."""
        if self.alpha_units == "paper":
            return self.alpha * self.act_norm_factor**2
        return self.alpha


class MoESAE(SAE):
    """Base of the routed SAEs: ``b_router`` init, balance loss and whole-dictionary AuxK.

    Subclasses put ``"top1_counts_N"`` (tokens per top-1 expert) in the extras of
    ``_encode_n``, set ``Encoding.probs_BN``, and implement :meth:`_dead_encoder` and
    :meth:`expert_weights_BN`.
    """

    cfg: MoEConfig
    b_router: nn.Parameter

    def _dead_encoder(self, dead_A: Tensor, extras: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """``(W_AD, b_A)``: encoder rows (as ``[A, d]``) and bias (None = no bias) of the dead
        latents ``dead_A`` (global indices), as used in this forward (``extras``)."""
        raise NotImplementedError

    def expert_weights_BN(self, enc: Encoding) -> Tensor | None:
        """``[B, N]``: the weight each expert's latents get on each token when that expert is
        routed (None = 1 for every expert, e.g. Switch ``heaviside``); used by AuxK."""
        raise NotImplementedError

    def _aux_losses(
        self, x_n_BD: Tensor, x_hat_n_BD: Tensor, enc: Encoding, extras: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """``{"balance": ..., "auxk": ...}`` (``auxk`` only in training mode with AuxK on)."""
        if enc.probs_BN is None:
            raise ValueError(f"{type(self).__name__}._encode_n must return the router probabilities (probs_BN)")
        losses = {"balance": self._balance_loss(enc.probs_BN, extras["top1_counts_N"])}
        if self.training and self.cfg.auxk:
            losses["auxk"] = self._auxk_loss(x_n_BD, x_hat_n_BD, enc, extras)
        return losses

    def _balance_loss(self, probs_BN: Tensor, top1_counts_N: Tensor) -> Tensor:
        """``balance_coeff * N * sum_i f_i P_i`` (f_i carries no gradient; fp32 under autocast)."""
        f_N = top1_counts_N.float() / probs_BN.shape[0]
        return self.cfg.balance_coeff * self.cfg.n_experts * (f_N * probs_BN.float().mean(0)).sum()

    def _auxk_loss(self, x_n_BD: Tensor, x_hat_n_BD: Tensor, enc: Encoding, extras: dict[str, Tensor]) -> Tensor:
        """Gao's AuxK over the dead latents of the whole dictionary (0 when none is dead)."""
        dead_M, k_aux = self._auxk_selection()
        if dead_M is None:
            return x_n_BD.new_zeros(())
        dead_A = dead_M.nonzero().squeeze(1)
        W_AD, b_A = self._dead_encoder(dead_A, extras)
        if b_A is None:
            b_A = W_AD.new_zeros(W_AD.shape[0])
        # pre-activations of the dead latents only; top-k_aux with a sparse backward
        pre_BA, pos_BA, _, _, _ = kernels.topk_linear(x_n_BD - self.b_dec, W_AD.t(), b_A, k_aux)
        idx_BA = dead_A[pos_BA]
        scale_BA = None
        if self.cfg.auxk_expert_weight:
            w_BN = self.expert_weights_BN(enc)
            if w_BN is not None:
                scale_BA = w_BN.detach().gather(1, idx_BA // self.cfg.expert_width)
        return kernels.auxk_loss(x_n_BD - x_hat_n_BD, pre_BA, idx_BA, self.W_dec, self.cfg.aux_coeff, scale_BA)

    @torch.no_grad()
    def init_from_batch(self, x_BD: Tensor) -> None:
        """``b_dec`` and ``b_router`` = geometric median of the (normalised) first batch."""
        super().init_from_batch(x_BD)
        self.b_router.copy_(self.b_dec)
