"""Switch SAE (Mudide et al. 2024, arXiv 2410.08201; docs/reference.md §1).

Forward (normalised space, ``x_n = x * act_norm_factor``; N experts of n = M / N latents)::

    p   = softmax(W_router^T (x_n - b_router))     # [B, N], no router bias
    i*  = argmax p                                  # no gradient through the argmax
    z   = TopK_k(ReLU(W_enc^(i*)T (x_n - b_dec)))   # ONLY expert i*'s n latents, no b_enc
    x_hat_n = b_dec + p_{i*} * sum_j z_j W_dec[i* n + j]    (gate 1 if ``heaviside``)

Loss terms: ``mse`` (base), ``balance = c * N * sum_i f_i P_i`` with ``f_i`` the fraction of
tokens routed to expert i (no gradient), ``P_i`` the mean router probability and
``c = alpha * act_norm_factor**2`` (``alpha_units="paper"``: alpha is the paper's, defined on
raw activations) or ``c = alpha`` (``"normalised"``), and, in training with ``auxk`` on,
``auxk``: Gao's AuxK over the dead latents of the whole dictionary, regardless of routing
(dead latent j: ``pre_j = W_enc[:, j] . (x_n - b_dec)``, no bias), decoded with the gate
``p_{i(j)}`` of the latent's expert (``auxk_expert_weight``; 1 with ``heaviside``). Details
of both: :mod:`saepipe.saes.moe`.

Paper vs reference code (every difference is a flag; the paper's form is the default):

- ``alpha_units``: "paper" (default) makes ``alpha`` the paper's coefficient of
  ``||x - x_hat||^2 / d + alpha L_lb`` on RAW activations (as the reference code computes
  it); "normalised" applies alpha to the loss on normalised activations (scale-free).
- ``auxk``: neither the paper nor its code trains with Gao's AuxK (the code's variant is
  nearly inert); default True for fair comparisons with TopK (docs/reference.md §5), False to reproduce the
  paper.
- ``heaviside``: the paper's ablation (gate 1 instead of p_{i*}); default False = the paper.
- The reference code encodes all M latents densely and masks them; here only the routed
  expert's are computed (same values, real FLOP saving).

Efficiency (docs/reference.md §4): tokens are stable-sorted by expert and the encoder runs as ONE grouped
matmul against ``W_enc`` stored internally as ``[N, d, n]`` (experts with zero tokens are
fine); decode is one ``F.embedding_bag`` over global indices ``i* n + local``. No dense
``[B, M]`` tensor and no Python loop over experts on the hot path (the loop exists only as
the fallback of :func:`kernels.grouped_mm` for old torch / unaligned shapes).

Saved format: ``W_enc`` as ``[d, M]`` (expert i owns columns ``[i n, (i+1) n)``), ``b_enc``
zeros ``[M]``, ``W_router [d, N]``, ``b_router [d]``, ``router_bias`` zeros ``[N]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .base import Encoding
from .moe import MoEConfig, MoESAE


@dataclass
class SwitchConfig(MoEConfig):
    """Switch SAE hyper-parameters.

    Inherited from :class:`MoEConfig`: ``n_experts`` (8), ``alpha`` (3.0), ``alpha_units``
    ("paper": the balance term is ``alpha * act_norm_factor**2 * N sum f_i P_i``, i.e. alpha
    is the paper's coefficient on raw activations; "normalised": ``alpha * N sum f_i P_i``),
    ``auxk`` (True), ``auxk_expert_weight`` (True), ``k_aux`` (None -> d_in // 2),
    ``aux_coeff`` (1/32), ``dead_tokens`` (10M).
    """

    heaviside: bool = False  # ablation: gate = 1 instead of p_{i*}

    ARCH: ClassVar[str] = "switch"
    LABEL: ClassVar[str] = "Switch"
    ORDER: ClassVar[int] = 5
    SAELENS_ARCH: ClassVar[str | None] = "saepipe_switch"  # the plugin saepipe/interop/saelens.py

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k > self.expert_width:
            raise ValueError(f"k={self.k} must be <= latents per expert width // n_experts = {self.expert_width}")
        if not isinstance(self.heaviside, bool):
            raise ValueError(f"heaviside must be a bool, got {self.heaviside!r}")

    def flops_per_token(self) -> int:
        """``2 d N`` router + ``2 d (M/N)`` routed expert encoder + ``2 d k`` sparse decoder."""
        d, N, k = self.d_in, self.n_experts, self.k
        return 2 * d * N + 2 * d * self.expert_width + 2 * d * k

    def n_params(self) -> int:
        """``W_enc`` d M + ``W_dec`` M d + ``W_router`` d N + ``b_router`` d + ``b_dec`` d."""
        d, M, N = self.d_in, self.width, self.n_experts
        return 2 * d * M + d * N + 2 * d

    def encoder_fraction(self) -> float:
        """Only the routed expert's M/N encoder rows run."""
        return 1.0 / self.n_experts


class SwitchSAE(MoESAE):
    """Top-1 routed mixture of TopK experts with a shared decoder pre-bias."""

    cfg: SwitchConfig

    def __init__(self, cfg: SwitchConfig):
        super().__init__(cfg)
        d, N, n = cfg.d_in, cfg.n_experts, cfg.expert_width
        self.W_enc = nn.Parameter(torch.empty(N, d, n))  # per-expert encoders, no bias
        self.W_router = nn.Parameter(torch.empty(d, N))
        self.b_router = nn.Parameter(torch.zeros(d))  # pre-router bias (not b_dec)
        self.reset_parameters()

    def _init_encoder(self, gen: torch.Generator) -> None:
        """nn.Linear-style ``U(-1/sqrt(d), 1/sqrt(d))`` experts and router; W_dec = W_enc^T."""
        bound = 1.0 / math.sqrt(self.cfg.d_in)
        self.W_enc.uniform_(-bound, bound, generator=gen)
        self.W_router.uniform_(-bound, bound, generator=gen)
        self.b_router.zero_()
        self._init_decoder_from_encoder(self.W_enc_DM())

    def W_enc_DM(self) -> Tensor:
        """Encoder in the saved ``[d, M]`` layout (differentiable view of ``W_enc [N, d, n]``)."""
        return self.W_enc.permute(1, 0, 2).reshape(self.cfg.d_in, self.cfg.width)

    def route(self, x_n_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router on normalised input: ``(probs_BN, expert_B, gate_B)``."""
        probs_BN = ((x_n_BD - self.b_router) @ self.W_router).softmax(dim=-1)
        expert_B = probs_BN.argmax(dim=-1)
        if self.cfg.heaviside:
            gate_B = torch.ones_like(probs_BN[:, 0])
        else:
            gate_B = probs_BN.gather(1, expert_B[:, None]).squeeze(1)
        return probs_BN, expert_B, gate_B

    def _encode_n(self, x_n_BD: Tensor) -> tuple[Encoding, dict[str, Tensor]]:
        n = self.cfg.expert_width
        probs_BN, expert_B, gate_B = self.route(x_n_BD)
        order_B, inverse_B, counts_N = kernels.sort_by_expert(expert_B, self.cfg.n_experts)
        x_sorted_BD = (x_n_BD - self.b_dec)[order_B]
        pre_sorted_Bn = kernels.grouped_mm(x_sorted_BD, self.W_enc, counts_N)
        vals_BK, local_BK = pre_sorted_Bn.topk(self.cfg.k, dim=-1, sorted=False)
        acts_BK = F.relu(vals_BK)[inverse_B]
        idx_BK = expert_B[:, None] * n + local_BK[inverse_B]
        enc = Encoding(acts_BK, idx_BK, gate_B, expert_B, probs_BN, experts_BE=expert_B[:, None])
        return enc, {"top1_counts_N": counts_N}

    def _dead_encoder(self, dead_A: Tensor, extras: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """``W_enc`` columns of the dead latents as ``[A, d]``; Switch has no encoder bias."""
        n = self.cfg.expert_width
        return self.W_enc[dead_A // n, :, dead_A % n], None

    def expert_weights_BN(self, enc: Encoding) -> Tensor | None:
        """Gate of expert i when routed: ``p_i`` (None = 1 with ``heaviside``)."""
        return None if self.cfg.heaviside else enc.probs_BN

    def saved_tensors(self) -> dict[str, Tensor]:
        M, N = self.cfg.width, self.cfg.n_experts
        return {
            **super().saved_tensors(),
            "W_enc": self.W_enc_DM(),
            "b_enc": self.W_enc.new_zeros(M),
            "W_router": self.W_router,
            "b_router": self.b_router,
            "router_bias": self.W_router.new_zeros(N),
        }

    @torch.no_grad()
    def load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_saved_tensors(tensors)
        for name in ("b_enc", "router_bias"):
            if name in tensors and bool(tensors[name].any()):
                raise ValueError(f"switch SAE has no {name}; saved {name} must be all zeros")
        d, N, n = self.cfg.d_in, self.cfg.n_experts, self.cfg.expert_width
        self.W_enc.copy_(tensors["W_enc"].reshape(d, N, n).permute(1, 0, 2))
        self.W_router.copy_(tensors["W_router"])
        self.b_router.copy_(tensors["b_router"])
