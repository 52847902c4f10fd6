"""Scale SAE (Xu et al. 2025, arXiv 2511.05745; SPEC §1).

Forward (normalised space, ``x_n = x * act_norm_factor``; N experts of n = M / N latents,
expert i owns the global latents ``[i n, (i+1) n)``)::

    s   = softmax(W_router^T (x_n - b_router) + router_bias)        # [B, N]
    S   = top-e experts of s                                        # S[:, 0] = argmax s
    w_i = s_i                        (expert_weighting="prob", paper)
        = softmax_{j in S}(logit_j)  ("renorm_logits" = s_i / sum_{j in S} s_j)
        = softmax_{j in S}(s_j)      ("code_softmax_of_probs", reference code; ~1/e)
    W_hat_i = W_bar_i + (1 + omega_i) (W_enc^(i) - W_bar_i)         (feature scaling)
    f_i = w_i * ReLU(W_hat_i^T (x_n - b_dec) + b_enc^(i))           # only for i in S
    z   = TopK_k over the concatenated e*n latents of S (weights applied BEFORE the TopK)
    x_hat_n = b_dec + sum_j z_j W_dec[i_j n + local_j]

Low-pass filter ``W_bar_i`` (a d-vector per expert, broadcast over the n latent columns;
flag ``lowpass``, SPEC "paper App. C"; the App. C text was not available, so the meanings
below are this project's definitions):

- ``"mean"`` (default, paper main text): ``W_bar_i = (1/n) sum_j W_enc^(i)[:, j]``, the
  "DC" component; ``W_hat_i`` amplifies each latent's deviation from the expert mean.
- ``"identity"``: the whole weight counts as high-frequency (low-pass output 0,
  ``W_bar_i = 0``), so ``W_hat_i = (1 + omega_i) W_enc^(i)``: a plain learned per-expert gain,
  the control that separates "scaling" from "decomposition". (The other literal reading,
  low-pass = identity, ``W_bar = W``, gives ``W_hat = W`` = ``feature_scaling: false``.)
- ``"learned"``: a learned low-pass average ``W_bar_i = sum_j a_ij W_enc^(i)[:, j]`` with
  ``a_i = softmax(lowpass_logits[i])`` over the n latents; ``lowpass_logits [N, n]`` starts
  at 0, i.e. at ``"mean"``, and is saved under that name.

With ``feature_scaling=False`` ``W_hat = W_enc`` (``omega`` is kept, unused, saved as zeros).
``w`` is differentiable for every weighting (router gradient through ``w`` and the balance
loss; the top-e selection itself gets none). Loss terms: ``mse`` (base) and
``balance = alpha * N * sum_i f_i P_i`` with ``f_i`` the fraction of tokens whose top-1
(argmax) expert is i (no gradient) and ``P_i`` the mean router probability.

Efficiency (SPEC §4): the B*e (token, selected expert) pairs are stable-sorted by expert and
encoded by ONE grouped matmul against ``W_hat [N, d, n]`` (recomputed per forward, O(dM));
each pair keeps its top-min(k, n) latents (the global top-k is a subset of their union), then
one TopK over ``e * min(k, n)`` candidates per token; decode is one ``F.embedding_bag``.

Decoder norm: ``"rows"`` (default) keeps every feature row of ``W_dec [M, d]`` unit-norm;
``"columns"`` reproduces the reference code, normalising dim 0 (each of the d columns, over
the M latents); ``before/after_optimizer_step`` then act on columns.

Saved format (SPEC §2): ``W_enc [d, M]`` (raw, not ``W_hat``), ``b_enc [M]``, ``W_dec``,
``b_dec``, ``W_router [d, N]``, ``b_router [d]``, ``router_bias [N]``, ``omega [N]``
(+ ``lowpass_logits [N, n]`` when ``lowpass="learned"``).
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

EXPERT_WEIGHTINGS = ("prob", "renorm_logits", "code_softmax_of_probs")
LOWPASS_FILTERS = ("mean", "identity", "learned")
DECODER_NORMS = ("rows", "columns")


@dataclass
class ScaleConfig(SAEConfig):
    """Scale SAE hyper-parameters."""

    n_experts: int = 8  # N experts; expert i owns latents [i * M/N, (i+1) * M/N)
    active_experts: int = 2  # e experts routed per token (top-e of the router), 1 <= e <= N
    alpha: float = 3.0  # load-balancing loss coefficient (f_i from the top-1 expert)
    expert_weighting: str = "prob"  # w_i: "prob" | "renorm_logits" | "code_softmax_of_probs"
    feature_scaling: bool = True  # W_hat = W_bar + (1 + omega)(W_enc - W_bar); False = ablation
    lowpass: str = "mean"  # W_bar: "mean" (paper) | "identity" (W_bar = 0) | "learned"
    decoder_norm: str = "rows"  # unit-norm "rows" (features) | "columns" (reference-code bug)
    dead_tokens: int = 10_000_000  # tokens without firing after which a latent is dead

    ARCH: ClassVar[str] = "scale"

    def __post_init__(self) -> None:
        super().__post_init__()
        N, e = self.n_experts, self.active_experts
        if not isinstance(N, int) or N <= 0:
            raise ValueError(f"n_experts must be a positive int, got {N!r}")
        if self.width % N:
            raise ValueError(f"width={self.width} must be divisible by n_experts={N}")
        if not isinstance(e, int) or not 1 <= e <= N:
            raise ValueError(f"active_experts must be an int in [1, n_experts={N}], got {e!r}")
        if self.k > e * self.expert_width:
            raise ValueError(
                f"k={self.k} must be <= active_experts * latents per expert = "
                f"{e} * {self.expert_width} = {e * self.expert_width}"
            )
        for name, allowed in (("expert_weighting", EXPERT_WEIGHTINGS),
                              ("lowpass", LOWPASS_FILTERS), ("decoder_norm", DECODER_NORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.feature_scaling, bool):
            raise ValueError(f"feature_scaling must be a bool, got {self.feature_scaling!r}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha!r}")
        if self.dead_tokens < 0:
            raise ValueError(f"dead_tokens must be >= 0, got {self.dead_tokens!r}")

    def flops_per_token(self) -> int:
        """``2 d N`` router + ``2 d (e M/N)`` selected encoders + ``2 d k`` sparse decoder."""
        d, N, e, k = self.d_in, self.n_experts, self.active_experts, self.k
        return 2 * d * N + 2 * d * e * self.expert_width + 2 * d * k

    def encoder_fraction(self) -> float:
        """Only the e routed experts' e M/N encoder rows run."""
        return self.active_experts / self.n_experts

    @property
    def expert_width(self) -> int:
        """n = width // n_experts latents per expert."""
        return self.width // self.n_experts


class ScaleSAE(SAE):
    """Top-e routed mixture of experts with feature scaling and a global TopK."""

    cfg: ScaleConfig

    def __init__(self, cfg: ScaleConfig):
        super().__init__(cfg)
        d, M, N, n = cfg.d_in, cfg.width, cfg.n_experts, cfg.expert_width
        self.W_enc = nn.Parameter(torch.empty(N, d, n))  # per-expert encoders (raw, not W_hat)
        self.b_enc = nn.Parameter(torch.zeros(M))
        self.W_router = nn.Parameter(torch.empty(d, N))
        self.router_bias = nn.Parameter(torch.zeros(N))
        self.b_router = nn.Parameter(torch.zeros(d))  # pre-router bias (not b_dec)
        self.omega = nn.Parameter(torch.zeros(N))  # feature-scaling gain per expert
        if cfg.lowpass == "learned":
            self.lowpass_logits = nn.Parameter(torch.zeros(N, n))
        self.reset_parameters()

    def _init_encoder(self, gen: torch.Generator) -> None:
        """nn.Linear-style ``U(-1/sqrt(d), 1/sqrt(d))`` experts and router, zero biases and
        omega; W_dec = W_enc^T with unit rows (unit columns for ``decoder_norm="columns"``)."""
        bound = 1.0 / math.sqrt(self.cfg.d_in)
        self.W_enc.uniform_(-bound, bound, generator=gen)
        self.W_router.uniform_(-bound, bound, generator=gen)
        for p in (self.b_enc, self.router_bias, self.b_router, self.omega):
            p.zero_()
        if self.cfg.lowpass == "learned":
            self.lowpass_logits.zero_()
        self._init_decoder_from_encoder(self.W_enc_DM())
        if self.cfg.decoder_norm == "columns":
            self.after_optimizer_step()

    def W_enc_DM(self) -> Tensor:
        """Raw encoder in the saved ``[d, M]`` layout (differentiable view of ``W_enc``)."""
        return self.W_enc.permute(1, 0, 2).reshape(self.cfg.d_in, self.cfg.width)

    def W_hat(self) -> Tensor:
        """Effective encoder ``[N, d, n]`` after feature scaling (``W_enc`` when disabled)."""
        if not self.cfg.feature_scaling:
            return self.W_enc
        gain_N11 = (1.0 + self.omega)[:, None, None]
        if self.cfg.lowpass == "identity":
            return gain_N11 * self.W_enc
        if self.cfg.lowpass == "mean":
            W_bar_Nd1 = self.W_enc.mean(dim=2, keepdim=True)
        else:  # learned convex average over the n latent vectors
            W_bar_Nd1 = self.W_enc @ self.lowpass_logits.softmax(dim=1)[:, :, None]
        return W_bar_Nd1 + gain_N11 * (self.W_enc - W_bar_Nd1)

    def route(self, x_n_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router on normalised input: ``(probs_BN, experts_BE, weights_BE)``, column 0 = top-1."""
        logits_BN = (x_n_BD - self.b_router) @ self.W_router + self.router_bias
        probs_BN = logits_BN.softmax(dim=-1)
        p_sel_BE, experts_BE = probs_BN.topk(self.cfg.active_experts, dim=-1, sorted=True)
        mode = self.cfg.expert_weighting
        if mode == "prob":
            w_BE = p_sel_BE
        elif mode == "renorm_logits":
            w_BE = logits_BN.gather(1, experts_BE).softmax(dim=-1)
        else:  # "code_softmax_of_probs"
            w_BE = p_sel_BE.softmax(dim=-1)
        return probs_BN, experts_BE, w_BE

    def _encode_n(self, x_n_BD: Tensor) -> tuple[Encoding, dict[str, Tensor]]:
        cfg = self.cfg
        B, e, n, N = x_n_BD.shape[0], cfg.active_experts, cfg.expert_width, cfg.n_experts
        kk = min(cfg.k, n)
        probs_BN, experts_BE, w_BE = self.route(x_n_BD)
        # (token, expert) pairs p = b * e + j, sorted by expert; token of pair p is p // e.
        # index_select everywhere: its backward is an index_add (no sort, unlike x[idx]).
        expert_P = experts_BE.reshape(-1)
        order_P, inverse_P, counts_N = kernels.sort_by_expert(expert_P, N)
        expert_sorted_P = expert_P.index_select(0, order_P)
        x_sorted_PD = (x_n_BD - self.b_dec).index_select(0, order_P // e)
        pre_Pn = kernels.grouped_mm(x_sorted_PD, self.W_hat(), counts_N)
        pre_Pn = pre_Pn + self.b_enc.view(N, n).index_select(0, expert_sorted_P)
        # w_p > 0 is one scalar per pair: it cannot change the order inside a pair, so each
        # pair's top-kk runs on the raw pre-activations and only kk values get weighted.
        # Weights still act before the global TopK across the e pairs of a token.
        pre_Pk, local_Pk = pre_Pn.topk(kk, dim=1, sorted=False)
        vals_Pk = pre_Pk * w_BE.reshape(-1).index_select(0, order_P)[:, None]
        gidx_Pk = expert_sorted_P[:, None] * n + local_Pk
        vals_BC = vals_Pk.index_select(0, inverse_P).reshape(B, e * kk)  # candidates per token
        gidx_BC = gidx_Pk.index_select(0, inverse_P).reshape(B, e * kk)
        top_BK, pos_BK = vals_BC.topk(cfg.k, dim=1, sorted=False)
        enc = Encoding(F.relu(top_BK), gidx_BC.gather(1, pos_BK), None, experts_BE[:, 0], probs_BN,
                       experts_BE=experts_BE)
        return enc, {"experts_BE": experts_BE, "weights_BE": w_BE}

    def _aux_losses(
        self, x_n_BD: Tensor, x_hat_n_BD: Tensor, enc: Encoding, extras: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """``{"balance": alpha * N * sum_i f_i P_i}`` (f_i from the top-1 expert, no gradient)."""
        N = self.cfg.n_experts
        counts_N = torch.bincount(enc.expert_B, minlength=N)
        f_N = counts_N.to(enc.probs_BN.dtype) / x_n_BD.shape[0]
        return {"balance": self.cfg.alpha * N * (f_N * enc.probs_BN.mean(0)).sum()}

    @torch.no_grad()
    def init_from_batch(self, x_BD: Tensor) -> None:
        """``b_dec`` and ``b_router`` = geometric median of the (normalised) first batch."""
        super().init_from_batch(x_BD)
        self.b_router.copy_(self.b_dec)

    def before_optimizer_step(self) -> None:
        """Remove the gradient component parallel to each decoder row (column if configured)."""
        if self.cfg.decoder_norm == "rows":
            return super().before_optimizer_step()
        grad = self.W_dec.grad
        if grad is not None:  # kernels.remove_parallel_grad_ on the transposed problem
            with torch.no_grad():
                u_MD = F.normalize(self.W_dec, dim=0, eps=1e-8)
                grad.sub_((grad * u_MD).sum(0, keepdim=True) * u_MD)

    def after_optimizer_step(self) -> None:
        """Renormalise decoder rows (``"columns"``: dim 0 of ``W_dec [M, d]``) to unit norm."""
        if self.cfg.decoder_norm == "rows":
            return super().after_optimizer_step()
        kernels.normalise_rows_(self.W_dec.data.t())  # in place through the transposed view

    def _saved_tensors(self) -> dict[str, Tensor]:
        tensors = {**super()._saved_tensors(), "W_enc": self.W_enc_DM(), "b_enc": self.b_enc,
                   "W_router": self.W_router, "b_router": self.b_router,
                   "router_bias": self.router_bias, "omega": self.omega}
        if self.cfg.lowpass == "learned":
            tensors["lowpass_logits"] = self.lowpass_logits
        return tensors

    @torch.no_grad()
    def _load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        super()._load_saved_tensors(tensors)
        d, N, n = self.cfg.d_in, self.cfg.n_experts, self.cfg.expert_width
        self.W_enc.copy_(tensors["W_enc"].reshape(d, N, n).permute(1, 0, 2))
        for name in ("b_enc", "W_router", "b_router", "router_bias", "omega"):
            getattr(self, name).copy_(tensors[name])
        if self.cfg.lowpass == "learned":
            self.lowpass_logits.copy_(tensors["lowpass_logits"])

    def saved_metadata(self) -> dict[str, Any]:
        return {**super().saved_metadata(), "n_experts": self.cfg.n_experts,
                "active_experts": self.cfg.active_experts}
