"""Switch SAE (Mudide et al. 2024, arXiv 2410.08201; SPEC §1).

Forward (normalised space, ``x_n = x * act_norm_factor``; N experts of n = M / N latents)::

    p   = softmax(W_router^T (x_n - b_router))     # [B, N], no router bias
    i*  = argmax p                                  # no gradient through the argmax
    z   = TopK_k(ReLU(W_enc^(i*)T (x_n - b_dec)))   # ONLY expert i*'s n latents, no b_enc
    x_hat_n = b_dec + p_{i*} * sum_j z_j W_dec[i* n + j]    (gate 1 if ``heaviside``)

Loss terms: ``mse`` (base) and ``balance = alpha * N * sum_i f_i P_i`` with ``f_i`` the
fraction of tokens routed to expert i (no gradient) and ``P_i`` the mean router probability.

Efficiency (SPEC §4): tokens are stable-sorted by expert and the encoder runs as ONE grouped
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
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .base import SAE, Encoding, SAEConfig


@dataclass
class SwitchConfig(SAEConfig):
    """Switch SAE hyper-parameters."""

    n_experts: int = 8  # N experts; expert i owns latents [i * M/N, (i+1) * M/N)
    alpha: float = 3.0  # load-balancing loss coefficient
    heaviside: bool = False  # ablation: gate = 1 instead of p_{i*}
    dead_tokens: int = 10_000_000  # tokens without firing after which a latent is dead

    ARCH: ClassVar[str] = "switch"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_experts, int) or self.n_experts <= 0:
            raise ValueError(f"n_experts must be a positive int, got {self.n_experts!r}")
        if self.width % self.n_experts:
            raise ValueError(
                f"width={self.width} must be divisible by n_experts={self.n_experts}"
            )
        if self.k > self.width // self.n_experts:
            raise ValueError(
                f"k={self.k} must be <= latents per expert width // n_experts = "
                f"{self.width // self.n_experts}"
            )
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha!r}")
        if self.dead_tokens < 0:
            raise ValueError(f"dead_tokens must be >= 0, got {self.dead_tokens!r}")

    def flops_per_token(self) -> int:
        """``2 d N`` router + ``2 d (M/N)`` routed expert encoder + ``2 d k`` sparse decoder."""
        d, N, k = self.d_in, self.n_experts, self.k
        return 2 * d * N + 2 * d * self.expert_width + 2 * d * k

    def encoder_fraction(self) -> float:
        """Only the routed expert's M/N encoder rows run."""
        return 1.0 / self.n_experts

    @property
    def expert_width(self) -> int:
        """n = width // n_experts latents per expert."""
        return self.width // self.n_experts


class SwitchSAE(SAE):
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
        return enc, {"counts_N": counts_N}

    def _aux_losses(
        self, x_n_BD: Tensor, x_hat_n_BD: Tensor, enc: Encoding, extras: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """``{"balance": alpha * N * sum_i f_i P_i}`` (f_i carries no gradient)."""
        N = self.cfg.n_experts
        f_N = extras["counts_N"].to(enc.probs_BN.dtype) / x_n_BD.shape[0]
        P_N = enc.probs_BN.mean(0)
        return {"balance": self.cfg.alpha * N * (f_N * P_N).sum()}

    @torch.no_grad()
    def init_from_batch(self, x_BD: Tensor) -> None:
        """``b_dec`` and ``b_router`` = geometric median of the (normalised) first batch."""
        super().init_from_batch(x_BD)
        self.b_router.copy_(self.b_dec)

    def _saved_tensors(self) -> dict[str, Tensor]:
        M, N = self.cfg.width, self.cfg.n_experts
        return {
            **super()._saved_tensors(),
            "W_enc": self.W_enc_DM(),
            "b_enc": self.W_enc.new_zeros(M),
            "W_router": self.W_router,
            "b_router": self.b_router,
            "router_bias": self.W_router.new_zeros(N),
        }

    @torch.no_grad()
    def _load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        super()._load_saved_tensors(tensors)
        for name in ("b_enc", "router_bias"):
            if name in tensors and bool(tensors[name].any()):
                raise ValueError(f"switch SAE has no {name}; saved {name} must be all zeros")
        d, N, n = self.cfg.d_in, self.cfg.n_experts, self.cfg.expert_width
        self.W_enc.copy_(tensors["W_enc"].reshape(d, N, n).permute(1, 0, 2))
        self.W_router.copy_(tensors["W_router"])
        self.b_router.copy_(tensors["b_router"])

    def saved_metadata(self) -> dict[str, Any]:
        return {**super().saved_metadata(), "n_experts": self.cfg.n_experts, "active_experts": 1}
