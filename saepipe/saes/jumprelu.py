"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; docs/reference.md §1).

Forward (normalised space, ``x_n = x * act_norm_factor``)::

    r = ReLU(W_enc^T (x_n - b_dec) + b_enc)          # [B, M], dense encoder (inherent)
    f = r * H(r - threshold)                          # per-latent threshold [M]
    x_hat_n = b_dec + sum_{j: f_j > 0} f_j W_dec[j]   # one F.embedding_bag

Straight-through estimator (paper §3, rectangle kernel ``K(u) = 1[|u| < 1/2]``, bandwidth
``eps``): the Heaviside step has pseudo-derivatives only w.r.t. the threshold,
``d f / d theta = -(theta / eps) K((r - theta) / eps)`` and
``d H(r - theta) / d theta = -(1 / eps) K((r - theta) / eps)``; w.r.t. ``r`` the JumpReLU
passes ``H(r - theta)`` and the step passes nothing (so the L0 penalty trains only the
thresholds, as in the paper). :class:`_JumpReLU` returns ``f`` and the active mask in one
pass; :class:`_StepSum` gives the L0 count with its threshold pseudo-derivative.

Loss terms (the paper's per-token loss divided by ``d``, like the base ``mse`` term)::

    mse        = mean_b ||x_n - x_hat_n||^2 / d
    l0_penalty = l0_coeff * mean_b ||f_b||_0 / d

so ``l0_coeff`` is the paper's lambda (squared-error units per active latent, normalised
space). The measured L0 is ``(acts_BK > 0).sum(-1)`` (exact: padded code below) and equals
``l0_penalty * d / l0_coeff``.

Threshold parameterisation: the raw threshold, not the paper's log-threshold: it is saved
exactly as docs/reference.md §2 ``threshold`` [M], and Adam moves it at a useful speed from its small init
(``threshold_init``, paper 1e-3; a log-parameter moves multiplicatively, ~lr per step). It is
clamped to ``>= 0`` after every step (a negative threshold would count the zeros of ``r`` as
active). Decoder rows unit-norm (base hooks).

Init: random unit decoder rows, ``W_enc = enc_init_norm * W_dec^T`` (``enc_init_norm = 1``
is the tied init ``W_enc = W_dec^T``), ``b_enc = 0``. At init about half of the M latents fire,
so with a unit-scale encoder ``x_hat`` sums ~M/2 sizeable unit rows and the first steps are
spent collapsing that overshoot; the small default avoids it (synthetic recovery test,
l0_coeff 0.3: recovery 0.82-0.84 at 0.05 vs 0.58 at 1.0). Keep ``threshold_init`` well below
the initial pre-activation scale (~ enc_init_norm * ||x|| / sqrt(d)) or no latent ever fires.

Variable L0, computed as the ReLU SAE's (:mod:`saepipe.saes.relu`): a wide code trains fused
and dense (:func:`dense_code.jumprelu_dense`, the same STE written out; the output's sparse
code, built when read, holds the active entries), a narrow one as the padded
``(acts_BL, idx_BL)`` code with a sparse encoder backward. When autograd records, that padded
code also holds the inactive entries inside the STE window
(``theta - eps/2 < r <= theta``) with ``acts = 0``: the threshold's pseudo-derivative needs
``dL/df`` there too, and the sparse decode only yields it for entries in the code. They count
nowhere (``acts > 0`` is the activity test everywhere), so only ``acts == 0`` entries may carry
a nonzero ``idx``. (Without them the thresholds see only the active side of the window and
are biased upwards: on the synthetic test at l0_coeff 0.1, L0 3-4 instead of the STE's 15.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dense_code, kernels
from .base import SAE, Encoding, SAEConfig


class _JumpReLU(torch.autograd.Function):
    """``(f, H) = (r * H(r - theta), H(r - theta))`` with the paper's STE pseudo-derivatives.

    ``theta`` broadcasts against ``r`` (``[M]`` for a dense ``[B, M]`` code, or ``[B, L]``
    gathered per entry of a padded code); its gradient is summed back to its shape."""

    @staticmethod
    def forward(ctx, r_BM, theta_M, eps):
        active_BM = r_BM > theta_M
        ctx.save_for_backward(r_BM, theta_M)
        ctx.eps = eps
        ctx.mark_non_differentiable(active_BM)
        return r_BM * active_BM, active_BM

    @staticmethod
    def backward(ctx, g_f_BM, _g_active):
        r_BM, theta_M = ctx.saved_tensors
        eps = ctx.eps
        grad_r = g_f_BM * (r_BM > theta_M) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            window_BM = ((r_BM - theta_M).abs() < eps / 2).to(g_f_BM.dtype)
            grad_theta = (-(theta_M / eps) * (g_f_BM * window_BM)).sum_to_size(theta_M.shape)
        return grad_r, grad_theta, None


class _StepSum(torch.autograd.Function):
    """``sum H(r - theta)`` over the entries with ``valid`` (the L0 count) with
    ``d/d theta = -(1/eps) K((r - theta)/eps)``; ``theta`` broadcasts as in :class:`_JumpReLU`."""

    @staticmethod
    def forward(ctx, r_BM, theta_M, eps, valid_BM):
        ctx.save_for_backward(r_BM, theta_M, valid_BM)
        ctx.eps = eps
        return ((r_BM > theta_M) & valid_BM).sum().to(torch.float32)  # exact count (not bf16)

    @staticmethod
    def backward(ctx, g):
        r_BM, theta_M, valid_BM = ctx.saved_tensors
        grad_theta = None
        if ctx.needs_input_grad[1]:
            in_window_BM = ((r_BM - theta_M).abs() < ctx.eps / 2) & valid_BM
            grad_theta = (-(g / ctx.eps) * in_window_BM.to(theta_M.dtype)).sum_to_size(theta_M.shape)
        return None, grad_theta, None, None


@dataclass
class JumpReLUConfig(SAEConfig):
    """JumpReLU SAE hyper-parameters.

    ``k`` is NOT used by the forward pass (L0 is measured, not set): it is the expected L0
    used for the FLOP estimate ``2 d M + 2 d k`` (sparse decode of k active latents).
    """

    l0_coeff: float = 1.0  # lambda of the L0 penalty (paper scale, see module docstring)
    bandwidth: float = 1e-3  # STE rectangle-kernel width eps (normalised space)
    threshold_init: float = 1e-3  # initial threshold of every latent
    enc_init_norm: float = 0.05  # L2 norm of every encoder column at init (W_enc = norm * W_dec^T)
    dead_tokens: int = 10_000_000  # tokens without firing after which a latent counts as dead

    ARCH: ClassVar[str] = "jumprelu"
    LABEL: ClassVar[str] = "JumpReLU"
    ORDER: ClassVar[int] = 3
    L0_FIXED: ClassVar[bool] = False  # L0 is measured; k is its expected value
    HAS_THRESHOLD: ClassVar[bool] = True
    SAELENS_ARCH: ClassVar[str | None] = "jumprelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.l0_coeff >= 0:
            raise ValueError(f"l0_coeff must be >= 0, got {self.l0_coeff!r}")
        if not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {self.bandwidth!r}")
        if not self.threshold_init >= 0:
            raise ValueError(f"threshold_init must be >= 0, got {self.threshold_init!r}")
        if not self.enc_init_norm > 0:
            raise ValueError(f"enc_init_norm must be > 0, got {self.enc_init_norm!r}")
        if self.dead_tokens < 0:
            raise ValueError(f"dead_tokens must be >= 0, got {self.dead_tokens!r}")

    def n_params(self) -> int:
        """Dense ``2 d M + M + d`` plus the per-latent ``threshold`` [M]."""
        return super().n_params() + self.width


class JumpReLUSAE(SAE):
    """JumpReLU SAE: per-latent learned threshold (STE), L0 penalty, unit-norm decoder."""

    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.width))
        self.b_enc = nn.Parameter(torch.zeros(cfg.width))
        self.threshold = nn.Parameter(torch.empty(cfg.width))
        self.reset_parameters()

    def _init_encoder(self, gen: torch.Generator) -> None:
        """Random unit decoder rows, W_enc = enc_init_norm * W_dec^T, b_enc 0, threshold_init."""
        bound = 1.0 / math.sqrt(self.cfg.d_in)
        self.W_enc.uniform_(-bound, bound, generator=gen)
        self.b_enc.zero_()
        self.threshold.fill_(self.cfg.threshold_init)
        self._init_decoder_from_encoder(self.W_enc)
        self.W_enc.copy_(self.W_dec.t() * self.cfg.enc_init_norm)

    def _encode_n(self, x_n_BD: Tensor) -> tuple[Encoding, dict[str, Tensor]]:
        """Padded code (with the STE window's inactive entries when the threshold trains) and
        a sparse encoder backward; without autograd a wide code also comes dense."""
        x_c_BD, b_eff_M = kernels.centred_input(x_n_BD, self.b_dec, self.W_enc, self.b_enc)
        theta_M, eps = self.threshold, self.cfg.bandwidth
        grad = torch.is_grad_enabled()
        with torch.no_grad():
            r_BM = torch.addmm(b_eff_M, x_c_BD, self.W_enc).relu_()
            code_BM = r_BM > theta_M
            if grad and theta_M.requires_grad:
                # The STE needs dL/df on the whole window |r - theta| < eps/2, including the
                # inactive side (f = 0): keep those entries in the code with value 0.
                code_BM |= (r_BM - theta_M).abs() < eps / 2
        idx_BL, valid_BL = kernels.padded_indices(code_BM)
        r_BL = F.relu(kernels.gather_linear(x_c_BD, self.W_enc, b_eff_M, r_BM, idx_BL, valid_BL))
        theta_BL = theta_M.index_select(0, idx_BL.reshape(-1)).view(idx_BL.shape)
        f_BL, _ = _JumpReLU.apply(r_BL, theta_BL, eps)
        wide = idx_BL.shape[1] >= r_BM.shape[1] * kernels.DENSE_DECODE_MIN_FILL
        dense_BM = r_BM.mul_(code_BM) if wide and not grad else None
        extras = {"r_BL": r_BL, "theta_BL": theta_BL, "valid_BL": valid_BL}
        return Encoding(f_BL * valid_BL, idx_BL, dense_BM=dense_BM), extras

    def _encode_decode_n(self, x_n_BD: Tensor) -> tuple[Encoding, dict[str, Tensor], Tensor]:
        """Training on a wide code: encoder, JumpReLU (STE) and decoder fused
        (:func:`dense_code.jumprelu_dense`)."""
        if not (torch.is_grad_enabled() and self._wide(x_n_BD)):
            return super()._encode_decode_n(x_n_BD)
        x_hat_BD, f_BM, count = dense_code.jumprelu_dense(
            x_n_BD, self.b_dec, self.W_enc, self.b_enc, self.threshold, self.W_dec, self.cfg.bandwidth
        )
        return Encoding(None, None, dense_BM=f_BM), {"l0_count": count}, x_hat_BD + self.b_dec

    @torch.no_grad()
    def _wide(self, x_n_BD: Tensor, rows: int = 256) -> bool:
        """Whether the code is wide (:func:`kernels.code_is_wide`), from the first ``rows`` tokens."""
        r_BM = torch.addmm(self.b_enc, x_n_BD[:rows] - self.b_dec, self.W_enc).relu_()
        return kernels.code_is_wide(r_BM > self.threshold)

    def _aux_losses(
        self, x_n_BD: Tensor, x_hat_n_BD: Tensor, enc: Encoding, extras: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """``{"l0_penalty": l0_coeff / d * mean_b L0_b}`` (STE gradient to the threshold)."""
        count = extras.get("l0_count")
        if count is None:  # padded code: every active or in-window entry is in it
            count = _StepSum.apply(extras["r_BL"], extras["theta_BL"], self.cfg.bandwidth, extras["valid_BL"])
        return {"l0_penalty": count * (self.cfg.l0_coeff / (self.cfg.d_in * x_n_BD.shape[0]))}

    def after_optimizer_step(self) -> None:
        """Unit-norm decoder rows; thresholds clamped to >= 0."""
        super().after_optimizer_step()
        self.threshold.data.clamp_(min=0)

    def saved_tensors(self) -> dict[str, Tensor]:
        return {**super().saved_tensors(), "W_enc": self.W_enc, "b_enc": self.b_enc, "threshold": self.threshold}

    @torch.no_grad()
    def load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_saved_tensors(tensors)
        self.W_enc.copy_(tensors["W_enc"])
        self.b_enc.copy_(tensors["b_enc"])
        self.threshold.copy_(tensors["threshold"])


__all__ = ["JumpReLUConfig", "JumpReLUSAE"]
