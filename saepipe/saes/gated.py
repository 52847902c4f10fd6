"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs"; docs/reference.md §1).

Forward (normalised space, ``x_n = x * act_norm_factor``; ``W = W_enc`` [d, M] is the gate
encoder, the magnitude encoder is ``W_mag = exp(r_mag) * W`` column-wise, so ONE dense matmul
serves both paths)::

    p       = W^T (x_n - b_dec)                          # [B, M], dense encoder (inherent)
    pi_gate = p + b_gate
    mag     = exp(r_mag) * p + b_mag
    f       = 1[pi_gate > 0] * ReLU(mag)
    x_hat_n = b_dec + sum_{j: f_j > 0} f_j W_dec[j]      # one F.embedding_bag

Loss terms (the paper's per-token loss divided by ``d``, like the base ``mse`` term)::

    mse      = mean_b ||x_n - x_hat_n||^2 / d
    l1_gate  = l1_coeff * mean_b ||ReLU(pi_gate)||_1 / d
    aux_gate = mean_b ||x_n - (sg(W_dec)^T ReLU(pi_gate) + sg(b_dec))||^2 / d

(``sg`` = stop-gradient: the auxiliary term trains only the gate path: W, b_gate and b_dec via
the encoder input, never W_dec / b_dec through the decoder). The Heaviside gate passes no
gradient; the gate path learns from ``l1_gate`` and ``aux_gate``. Unit-norm decoder rows
(base hooks), which makes the plain L1 on the gate meaningful.

Computed as the ReLU SAE's (:mod:`saepipe.saes.relu`): a wide gate code trains fused and dense
(:func:`dense_code.gated_dense`: one encoder matmul, both decodes, the backward written out);
a narrow one over the padded code of the open gates (``pi_gate > 0``, which holds every
``f > 0``) with a sparse encoder backward and embedding_bag decodes of ``f`` and of
``ReLU(pi_gate)``.

Init: random unit decoder rows, ``W = enc_init_norm * W_dec^T`` (1 = tied init), b_gate,
r_mag, b_mag zero; the small default (0.05) avoids the initial overshoot of ~M/2 active
latents on unit decoder rows (synthetic recovery test, l1_coeff 2: recovery 0.97 at 0.05 vs
0.75 at 0.1).

Saved (docs/reference.md §2): ``W_enc`` = W [d, M], ``b_enc`` = zeros [M] (the arch has no such bias),
``b_gate``, ``r_mag``, ``b_mag`` [M], ``W_dec``, ``b_dec``. Variable L0 -> the padded
``(acts_BL, idx_BL)`` code of the active latents (``f > 0``).
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


@dataclass
class GatedConfig(SAEConfig):
    """Gated SAE hyper-parameters.

    ``k`` is NOT used by the forward pass (L0 is measured, not set): it is the expected L0
    used for the FLOP estimate ``2 d M + 2 d k`` (one shared encoder matmul + sparse decode).
    """

    l1_coeff: float = 1.0  # lambda of the L1 penalty on ReLU(pi_gate) (paper scale, see module)
    enc_init_norm: float = 0.05  # L2 norm of every encoder column at init (W_enc = norm * W_dec^T)
    dead_tokens: int = 10_000_000  # tokens without firing after which a latent counts as dead

    ARCH: ClassVar[str] = "gated"
    LABEL: ClassVar[str] = "Gated"
    ORDER: ClassVar[int] = 4
    L0_FIXED: ClassVar[bool] = False  # L0 is measured; k is its expected value
    SAELENS_ARCH: ClassVar[str | None] = "gated"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.l1_coeff >= 0:
            raise ValueError(f"l1_coeff must be >= 0, got {self.l1_coeff!r}")
        if not self.enc_init_norm > 0:
            raise ValueError(f"enc_init_norm must be > 0, got {self.enc_init_norm!r}")
        if self.dead_tokens < 0:
            raise ValueError(f"dead_tokens must be >= 0, got {self.dead_tokens!r}")

    def n_params(self) -> int:
        """``W_enc`` d M, ``W_dec`` M d, ``b_gate``, ``r_mag``, ``b_mag`` (M each), ``b_dec`` d."""
        d, M = self.d_in, self.width
        return 2 * d * M + 3 * M + d


class GatedSAE(SAE):
    """Gated SAE with tied gate/magnitude encoder, auxiliary gate loss, unit-norm decoder."""

    cfg: GatedConfig

    def __init__(self, cfg: GatedConfig):
        super().__init__(cfg)
        M = cfg.width
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, M))
        self.b_gate = nn.Parameter(torch.zeros(M))
        self.r_mag = nn.Parameter(torch.zeros(M))
        self.b_mag = nn.Parameter(torch.zeros(M))
        self.reset_parameters()

    def _init_encoder(self, gen: torch.Generator) -> None:
        """Random unit decoder rows, W = enc_init_norm * W_dec^T; b_gate, r_mag, b_mag zero."""
        bound = 1.0 / math.sqrt(self.cfg.d_in)
        self.W_enc.uniform_(-bound, bound, generator=gen)
        for p in (self.b_gate, self.r_mag, self.b_mag):
            p.zero_()
        self._init_decoder_from_encoder(self.W_enc)
        self.W_enc.copy_(self.W_dec.t() * self.cfg.enc_init_norm)

    def _encode_n(self, x_n_BD: Tensor) -> tuple[Encoding, dict[str, Tensor]]:
        """Padded code over the open gates (``pi_gate > 0``, a superset of ``f > 0``) with a
        sparse encoder backward; the returned code keeps only ``f > 0``. Without autograd a
        wide code also comes dense, and the gate path is kept dense for the auxiliary loss."""
        M = self.cfg.width
        x_c_BD, b_eff_M = kernels.centred_input(x_n_BD, self.b_dec, self.W_enc, self.W_enc.new_zeros(M))
        with torch.no_grad():
            p_BM = torch.addmm(b_eff_M, x_c_BD, self.W_enc)
            gate_BM = (p_BM + self.b_gate).relu_()
        idx_BL, valid_BL = kernels.padded_indices(gate_BM > 0)
        p_BL = kernels.gather_linear(x_c_BD, self.W_enc, b_eff_M, p_BM, idx_BL, valid_BL)
        flat_S = idx_BL.reshape(-1)
        pi_gate_BL = p_BL + self.b_gate.index_select(0, flat_S).view(idx_BL.shape)
        mag_BL = torch.addcmul(
            self.b_mag.index_select(0, flat_S).view(idx_BL.shape),
            p_BL,
            self.r_mag.exp().index_select(0, flat_S).view(idx_BL.shape),
        )
        f_BL = F.relu(mag_BL) * ((pi_gate_BL > 0) & valid_BL)
        acts_BK, idx_BK = kernels.compact_code(f_BL, idx_BL)
        if not torch.is_grad_enabled():
            wide = acts_BK.shape[1] >= M * kernels.DENSE_DECODE_MIN_FILL
            f_BM = torch.addcmul(self.b_mag, p_BM, self.r_mag.exp()).relu_() * (gate_BM > 0) if wide else None
            return Encoding(acts_BK, idx_BK, dense_BM=f_BM), {"gate_BM": gate_BM}
        gate_BL = F.relu(pi_gate_BL) * valid_BL
        return Encoding(acts_BK, idx_BK), {"gate_BL": gate_BL, "gate_idx_BL": idx_BL}

    def _encode_decode_n(self, x_n_BD: Tensor) -> tuple[Encoding, dict[str, Tensor], Tensor]:
        """Training on a wide code: gate and magnitude paths, both decodes fused
        (:func:`dense_code.gated_dense`)."""
        if not (torch.is_grad_enabled() and self._wide(x_n_BD)):
            return super()._encode_decode_n(x_n_BD)
        x_hat_BD, x_aux_BD, f_BM, gate_sum_M = dense_code.gated_dense(
            x_n_BD, self.b_dec, self.W_enc, self.b_gate, self.r_mag, self.b_mag, self.W_dec
        )
        extras = {"x_aux_BD": x_aux_BD, "gate_sum_M": gate_sum_M}
        return Encoding(None, None, dense_BM=f_BM), extras, x_hat_BD + self.b_dec

    @torch.no_grad()
    def _wide(self, x_n_BD: Tensor, rows: int = 256) -> bool:
        """Whether the gate code is wide (:func:`kernels.code_is_wide`), from the first ``rows`` tokens."""
        p_BM = (x_n_BD[:rows] - self.b_dec) @ self.W_enc
        return kernels.code_is_wide(p_BM + self.b_gate > 0)

    def _aux_losses(
        self, x_n_BD: Tensor, x_hat_n_BD: Tensor, enc: Encoding, extras: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """``{"l1_gate": ..., "aux_gate": ...}`` (see module docstring)."""
        d, B = self.cfg.d_in, x_n_BD.shape[0]
        W_dec_MD = self.W_dec.detach()
        if "x_aux_BD" in extras:  # fused dense step
            x_aux_BD, gate_sum = extras["x_aux_BD"], extras["gate_sum_M"].sum()
        elif "gate_BM" in extras:  # without autograd: the gate path dense
            gate_BM = extras["gate_BM"]
            x_aux_BD, gate_sum = gate_BM @ W_dec_MD, gate_BM.sum()
        else:  # padded gate code
            gate_BL = extras["gate_BL"]
            x_aux_BD = kernels.sparse_decode(extras["gate_idx_BL"], gate_BL, W_dec_MD)
            gate_sum = gate_BL.sum()
        l1 = gate_sum * (self.cfg.l1_coeff / (d * B))
        aux = (x_n_BD - self.b_dec.detach() - x_aux_BD).pow(2).mean()
        return {"l1_gate": l1, "aux_gate": aux}

    def saved_tensors(self) -> dict[str, Tensor]:
        return {
            **super().saved_tensors(),
            "W_enc": self.W_enc,
            "b_enc": torch.zeros_like(self.b_gate),
            "b_gate": self.b_gate,
            "r_mag": self.r_mag,
            "b_mag": self.b_mag,
        }

    @torch.no_grad()
    def load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_saved_tensors(tensors)
        for name in ("W_enc", "b_gate", "r_mag", "b_mag"):
            getattr(self, name).copy_(tensors[name])


__all__ = ["GatedConfig", "GatedSAE"]
