"""Scale SAE (Xu et al. 2025, arXiv 2511.05745, §2.2 and App. C; docs/reference.md §1).

Forward (normalised space, ``x_n = x * act_norm_factor``; N experts of n = M / N latents,
expert i owns the global latents ``[i n, (i+1) n)``)::

    s   = softmax(W_router^T (x_n - b_router) + router_bias)        # [B, N]
    S   = top-e experts of s                                        # S[:, 0] = argmax s
    w_i = s_i                        (expert_weighting="prob", paper eq. 2.4)
        = softmax_{j in S}(logit_j)  ("renorm_logits" = s_i / sum_{j in S} s_j)
        = softmax_{j in S}(s_j)      ("code_softmax_of_probs", reference code; ~1/e)
    W_hat_i = LP_i + (1 + omega_i) (W_enc^(i) - LP_i)               (feature scaling, eq. 2.5)
    f_i = ReLU(W_hat_i^T (x_n - b_dec) + b_enc^(i))                 # only for i in S
    weight_order="after_topk" (paper eqs. 2.3-2.4):
        z = TopK_k over the concatenated e*n UNWEIGHTED f_i of S; acts = w_i * z
    weight_order="before_topk" (reference code):
        z = TopK_k over the concatenated e*n weighted w_i f_i;    acts = z
    x_hat_n = b_dec + sum_j acts_j W_dec[i_j n + local_j]

``acts_BK`` are the weighted values in both orders (what the decoder uses), so ``decode`` is
the same. ``TopK(ReLU(.)) = ReLU(TopK(.))``: the TopK runs on pre-activations.

Low-pass ``LP_i`` (App. C, with ``s = 1 + omega_i`` and ``M = W_enc^(i)`` [d, n]; flag
``lowpass``)::

    "mean"     (C.1, default): LP_i = mean_i, the average of expert i's n encoder vectors
               (a d-vector broadcast over the n columns): W_hat = (M - mean) s + mean
    "identity" (C.2): LP_i = I = torch.eye(d, n) (ones at [j, j], j < min(d, n)), the same
               for every expert: W_hat = (M - I) s + I
    "learned"  (C.3, as the reference code): LP_i = A_LP @ mean_i with ONE learned
               ``lowpass_A`` [d, d] shared by all experts, identity-initialised (so it starts
               equal to "mean"): W_hat = (M - A_LP mean_i) s + A_LP mean_i

With ``feature_scaling=False`` ``W_hat = W_enc`` (``omega`` and ``lowpass_A`` are kept, unused).
``d W_hat / d LP = -omega``: the learned low-pass only trains once omega moves off 0.
``w`` is differentiable for every weighting (router gradient through ``w`` and the balance
loss; the top-e selection itself gets none).

Loss terms: ``mse`` (base), ``balance = c * N * sum_i f_i P_i`` with ``f_i`` the fraction of
tokens whose top-1 (argmax) expert is i (no gradient), ``P_i`` the mean router probability
and ``c = alpha * act_norm_factor**2`` (``alpha_units="paper"``) or ``alpha``
(``"normalised"``), and in training with ``auxk`` on, ``auxk``: Gao's AuxK over the dead
latents of the whole dictionary regardless of routing (dead latent j:
``pre_j = W_hat[:, j] . (x_n - b_dec) + b_enc[j]``), decoded with the weight its expert gets
on the token (``auxk_expert_weight``; :meth:`ScaleSAE.expert_weights_BN`). See
:mod:`saepipe.saes.moe`.

Decoder norm (flag ``decoder_norm``): ``"rows"`` (default) keeps every feature row of
``W_dec [M, d]`` unit-norm and removes the gradient parallel to each row. ``"columns"``
reproduces the reference code: in each expert's ``[n, d]`` block of ``W_dec``, each of the d
columns is normalised over that expert's n latents; the gradient step still removes the
component parallel to each ROW (the standard ``remove_parallel_grad_``).

Paper vs reference code (every difference is a flag; the paper's form is the default):

- ``alpha_units``: "paper" (default): alpha is the paper's coefficient of eq. 2.2 on RAW
  activations; "normalised": alpha applied to the loss on normalised activations.
- ``auxk``: neither the paper nor its code uses Gao's AuxK; default True for fair
  comparisons with TopK (docs/reference.md §5), False to reproduce the paper.
- ``weight_order``: "after_topk" (paper eqs. 2.3-2.4: TopK on unweighted activations, then
  ``x_hat = sum_i p_i W_dec_i z_i``) | "before_topk" (reference code: weights applied before
  the TopK, so they influence which latents are selected).
- ``expert_weighting``: "prob" (paper: w_i = p_i) | "code_softmax_of_probs" (reference code:
  softmax over the selected probabilities, nearly uniform) | "renorm_logits" (neither:
  probabilities renormalised over the selected experts).
- ``lowpass``: "mean" (paper main text, App. C.1) | "identity" (C.2) | "learned" (C.3, with
  the reference code's shape: one identity-initialised d x d A_LP applied to the expert mean).
- ``decoder_norm``: "rows" (unit-norm features, as every TopK SAE) | "columns" (reference
  code, per-expert column normalisation; looks like a bug).

Efficiency (docs/reference.md §4): the B*e (token, selected expert) pairs are stable-sorted by expert and
encoded by ONE grouped matmul against ``W_hat [N, d, n]`` (recomputed per forward, O(dM));
each pair keeps its top-min(k, n) latents (the global top-k is a subset of their union: a
per-pair positive weight does not change the order inside a pair), then one TopK over the
``e * min(k, n)`` candidates per token; decode is one ``F.embedding_bag``.

Saved format (docs/reference.md §2): ``W_enc [d, M]`` (raw, not ``W_hat``), ``b_enc [M]``, ``W_dec``,
``b_dec``, ``W_router [d, N]``, ``b_router [d]``, ``router_bias [N]``, ``omega [N]``
(+ ``lowpass_A [d, d]`` when ``lowpass="learned"``). SAEs saved before the App. C
definitions (``lowpass_logits``, and ``"identity"`` meaning ``LP = 0``) are not loadable as
"learned" and compute a different ``W_hat`` as "identity".
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

EXPERT_WEIGHTINGS = ("prob", "renorm_logits", "code_softmax_of_probs")
WEIGHT_ORDERS = ("after_topk", "before_topk")
LOWPASS_FILTERS = ("mean", "identity", "learned")
DECODER_NORMS = ("rows", "columns")


@dataclass
class ScaleConfig(MoEConfig):
    """Scale SAE hyper-parameters.

    Inherited from :class:`MoEConfig`: ``n_experts`` (8), ``alpha`` (3.0; f_i from the top-1
    expert), ``alpha_units`` ("paper": the balance term is
    ``alpha * act_norm_factor**2 * N sum f_i P_i``, i.e. alpha is the paper's coefficient on
    raw activations; "normalised": ``alpha * N sum f_i P_i``), ``auxk`` (True),
    ``auxk_expert_weight`` (True), ``k_aux`` (None -> d_in // 2), ``aux_coeff`` (1/32),
    ``dead_tokens`` (10M).
    """

    active_experts: int = 2  # e experts routed per token (top-e of the router), 1 <= e <= N
    expert_weighting: str = "prob"  # w_i: "prob" (paper) | "renorm_logits" | "code_softmax_of_probs"
    # "after_topk": global TopK on unweighted activations, then x w_i (paper eqs. 2.3-2.4);
    # "before_topk": weights applied before the TopK (reference code)
    weight_order: str = "after_topk"
    feature_scaling: bool = True  # W_hat = LP + (1 + omega)(W_enc - LP); False = ablation
    lowpass: str = "mean"  # LP: "mean" (App. C.1) | "identity" (C.2, eye(d, n)) | "learned" (C.3)
    decoder_norm: str = "rows"  # unit-norm "rows" (features) | "columns" (reference code)

    ARCH: ClassVar[str] = "scale"
    LABEL: ClassVar[str] = "Scale"
    ORDER: ClassVar[int] = 6
    HAS_OMEGA: ClassVar[bool] = True
    SAELENS_ARCH: ClassVar[str | None] = "saepipe_scale"  # the plugin saepipe/interop/saelens.py

    def __post_init__(self) -> None:
        super().__post_init__()
        N, e = self.n_experts, self.active_experts
        if not isinstance(e, int) or isinstance(e, bool) or not 1 <= e <= N:
            raise ValueError(f"active_experts must be an int in [1, n_experts={N}], got {e!r}")
        if self.k > e * self.expert_width:
            raise ValueError(
                f"k={self.k} must be <= active_experts * latents per expert = "
                f"{e} * {self.expert_width} = {e * self.expert_width}"
            )
        for name, allowed in (
            ("expert_weighting", EXPERT_WEIGHTINGS),
            ("weight_order", WEIGHT_ORDERS),
            ("lowpass", LOWPASS_FILTERS),
            ("decoder_norm", DECODER_NORMS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.feature_scaling, bool):
            raise ValueError(f"feature_scaling must be a bool, got {self.feature_scaling!r}")

    @property
    def experts_per_token(self) -> int:
        """e = ``active_experts``."""
        return self.active_experts

    @property
    def omega_active(self) -> bool:
        """omega scales the encoder only with ``feature_scaling`` on."""
        return self.feature_scaling

    def flops_per_token(self) -> int:
        """``2 d N`` router + ``2 d (e M/N)`` selected encoders + ``2 d k`` sparse decoder."""
        d, N, e, k = self.d_in, self.n_experts, self.active_experts, self.k
        return 2 * d * N + 2 * d * e * self.expert_width + 2 * d * k

    def n_params(self) -> int:
        """``W_enc``, ``W_dec`` (d M each), ``b_enc`` M, ``W_router`` d N, ``router_bias`` N,
        ``omega`` N, ``b_router`` d, ``b_dec`` d, + ``lowpass_A`` d^2 when learned."""
        d, M, N = self.d_in, self.width, self.n_experts
        lowpass = d * d if self.lowpass == "learned" else 0
        return 2 * d * M + M + d * N + 2 * N + 2 * d + lowpass

    def encoder_fraction(self) -> float:
        """Only the e routed experts' e M/N encoder rows run."""
        return self.active_experts / self.n_experts


class ScaleSAE(MoESAE):
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
            self.lowpass_A = nn.Parameter(torch.eye(d))  # App. C.3 A_LP, shared by all experts
        self.reset_parameters()

    def _init_encoder(self, gen: torch.Generator) -> None:
        """nn.Linear-style ``U(-1/sqrt(d), 1/sqrt(d))`` experts and router, zero biases and
        omega, identity ``lowpass_A``; W_dec = W_enc^T with unit rows (then per-expert unit
        columns for ``decoder_norm="columns"``)."""
        bound = 1.0 / math.sqrt(self.cfg.d_in)
        self.W_enc.uniform_(-bound, bound, generator=gen)
        self.W_router.uniform_(-bound, bound, generator=gen)
        for p in (self.b_enc, self.router_bias, self.b_router, self.omega):
            p.zero_()
        if self.cfg.lowpass == "learned":
            self.lowpass_A.copy_(torch.eye(self.cfg.d_in))
        self._init_decoder_from_encoder(self.W_enc_DM())
        if self.cfg.decoder_norm == "columns":
            self.after_optimizer_step()

    def W_enc_DM(self) -> Tensor:
        """Raw encoder in the saved ``[d, M]`` layout (differentiable view of ``W_enc``)."""
        return self.W_enc.permute(1, 0, 2).reshape(self.cfg.d_in, self.cfg.width)

    def lowpass_component(self) -> Tensor:
        """Low-pass ``LP`` of App. C, broadcastable to ``W_enc [N, d, n]`` (see module)."""
        lowpass = self.cfg.lowpass
        if lowpass == "identity":  # C.2: rectangular identity, the same for every expert
            d, n = self.cfg.d_in, self.cfg.expert_width
            return torch.eye(d, n, dtype=self.W_enc.dtype, device=self.W_enc.device)[None]
        mean_Nd1 = self.W_enc.mean(dim=2, keepdim=True)  # C.1: expert mean (DC component)
        if lowpass == "mean":
            return mean_Nd1
        return self.lowpass_A @ mean_Nd1  # C.3: learned A_LP [d, d] applied to the mean

    def W_hat(self) -> Tensor:
        """Effective encoder ``[N, d, n]`` after feature scaling (``W_enc`` when disabled)."""
        if not self.cfg.feature_scaling:
            return self.W_enc
        lp = self.lowpass_component()
        return lp + (1.0 + self.omega)[:, None, None] * (self.W_enc - lp)

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
        W_hat_NDn = self.W_hat()
        pre_Pn = kernels.grouped_mm(x_sorted_PD, W_hat_NDn, counts_N)
        pre_Pn = pre_Pn + self.b_enc.view(N, n).index_select(0, expert_sorted_P)
        # A pair's weight w_p > 0 is one scalar: it cannot change the order inside the pair,
        # so each pair's top-kk runs on the unweighted pre-activations in both orders.
        pre_Pk, local_Pk = pre_Pn.topk(kk, dim=1, sorted=False)
        gidx_Pk = expert_sorted_P[:, None] * n + local_Pk
        raw_BC = pre_Pk.index_select(0, inverse_P).reshape(B, e * kk)  # candidates per token
        gidx_BC = gidx_Pk.index_select(0, inverse_P).reshape(B, e * kk)
        weighted_BC = raw_BC * w_BE.repeat_interleave(kk, dim=1)  # candidate c: expert c // kk
        key_BC = weighted_BC if cfg.weight_order == "before_topk" else raw_BC
        pos_BK = key_BC.detach().topk(cfg.k, dim=1, sorted=False).indices
        acts_BK = F.relu(weighted_BC.gather(1, pos_BK))
        top1_counts_N = torch.bincount(experts_BE[:, 0], minlength=N)
        enc = Encoding(acts_BK, gidx_BC.gather(1, pos_BK), None, experts_BE[:, 0], probs_BN, experts_BE=experts_BE)
        return enc, {"weights_BE": w_BE, "W_hat_NDn": W_hat_NDn, "top1_counts_N": top1_counts_N}

    def _dead_encoder(self, dead_A: Tensor, extras: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """Feature-scaled ``W_hat`` columns (as ``[A, d]``) and ``b_enc`` of the dead latents."""
        n = self.cfg.expert_width
        return extras["W_hat_NDn"][dead_A // n, :, dead_A % n], self.b_enc[dead_A]

    def expert_weights_BN(self, enc: Encoding) -> Tensor:
        """``expert_weighting`` extended to every expert (equal to ``w_i`` for the selected ones):
        "prob" ``p_i``; "renorm_logits" ``p_i / sum_{j in S} p_j``; "code_softmax_of_probs"
        ``exp(p_i) / sum_{j in S} exp(p_j)``."""
        probs_BN, experts_BE = enc.probs_BN, enc.experts_BE
        if probs_BN is None or experts_BE is None:
            raise ValueError("expert_weights_BN needs the routing of the encoding (probs_BN, experts_BE)")
        mode = self.cfg.expert_weighting
        if mode == "prob":
            return probs_BN
        if mode == "renorm_logits":
            return probs_BN / probs_BN.gather(1, experts_BE).sum(1, keepdim=True)
        return probs_BN.exp() / probs_BN.gather(1, experts_BE).exp().sum(1, keepdim=True)

    def after_optimizer_step(self) -> None:
        """Unit-norm decoder rows; ``"columns"``: per expert ``[n, d]`` block, unit-norm columns."""
        if self.cfg.decoder_norm == "rows":
            return super().after_optimizer_step()
        N, n, d = self.cfg.n_experts, self.cfg.expert_width, self.cfg.d_in
        W_Nnd = self.W_dec.data.view(N, n, d)
        W_Nnd.div_(W_Nnd.norm(dim=1, keepdim=True).clamp_min(1e-8))

    # before_optimizer_step: the base's row-wise parallel-gradient removal for both norms
    # (the reference code removes the component parallel to rows even when it normalises
    # columns).

    def saved_tensors(self) -> dict[str, Tensor]:
        tensors = {
            **super().saved_tensors(),
            "W_enc": self.W_enc_DM(),
            "b_enc": self.b_enc,
            "W_router": self.W_router,
            "b_router": self.b_router,
            "router_bias": self.router_bias,
            "omega": self.omega,
        }
        if self.cfg.lowpass == "learned":
            tensors["lowpass_A"] = self.lowpass_A
        return tensors

    @torch.no_grad()
    def load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_saved_tensors(tensors)
        d, N, n = self.cfg.d_in, self.cfg.n_experts, self.cfg.expert_width
        self.W_enc.copy_(tensors["W_enc"].reshape(d, N, n).permute(1, 0, 2))
        for name in ("b_enc", "W_router", "b_router", "router_bias", "omega"):
            getattr(self, name).copy_(tensors[name])
        if self.cfg.lowpass == "learned":
            if "lowpass_A" not in tensors:
                old = (
                    " (it has 'lowpass_logits', the pre-App. C softmax average over latents)"
                    if "lowpass_logits" in tensors
                    else ""
                )
                raise ValueError(
                    f"scale SAE with lowpass='learned' needs the tensor 'lowpass_A' [d, d] "
                    f"(App. C.3 A_LP); the saved file lacks it{old}. Retrain it with this "
                    f"version, or load it with lowpass='mean' to drop the learned low-pass."
                )
            self.lowpass_A.copy_(tensors["lowpass_A"])

    def extra_stats(self) -> dict[str, list[float]]:
        """``{"omega": [...]}``: the learned feature-scaling gain of each expert."""
        return {"omega": self.omega.detach().cpu().tolist()}

    def encoder_features_MD(self) -> Tensor:
        """Rows of the effective encoder ``W_hat`` (= ``W_enc`` with feature scaling off)."""
        N, d, n = self.W_enc.shape
        return self.W_hat().detach().permute(0, 2, 1).reshape(N * n, d)
