"""TopK SAE with AuxK (Gao et al. 2024; docs/reference.md §1).

Forward (normalised space, ``x_n = x * act_norm_factor``)::

    pre = W_enc^T (x_n - b_dec) + b_enc                  # [B, M], the only dense op
    z   = TopK_k(ReLU(pre))                              # kept as (acts_BK, idx_BK)
    x_hat_n = b_dec + sum_j z_j W_dec[idx_j]             # one F.embedding_bag

``TopK(ReLU(pre)) == ReLU(TopK(pre))`` (ReLU is monotone), so the TopK runs on ``pre`` and the
ReLU only on the k selected values. The encoder backward is sparse
(:func:`kernels.topk_linear`): only the ``B x k`` selected entries reach ``W_enc``/``b_enc``,
and ``b_dec`` gets its encoder-side gradient through an ``[M]`` bias term, so no dense
``[B, M]`` gradient or second ``[B, M] x [M, d]`` matmul is formed.

AuxK (training only, Gao's form): with ``dead`` = latents that have not fired for more than
``dead_tokens`` tokens, take the top-``k_aux`` dead latents of ``pre`` (ReLU'd), reconstruct
the detached residual ``e = x_n - x_hat_n`` WITHOUT ``b_dec``:
``e_hat = sum ReLU(pre_j) W_dec[j]``, and add
``aux_coeff * sum_b ||e_b - e_hat_b||^2 / sum_b ||e_b - mean_b(e)||^2``. The selection reuses
the encoder's pre-activations (:func:`kernels.topk_linear`: none dead, no search; all dead,
one search for both top-k's; some, the dead and the live columns each searched once) and
shares its sparse backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .base import SAE, AuxKConfigMixin, Encoding, SAEConfig


@dataclass
class TopKConfig(AuxKConfigMixin, SAEConfig):
    """TopK SAE hyper-parameters."""

    auxk: bool = True  # add the AuxK dead-latent loss during training
    k_aux: int | None = None  # dead latents used by AuxK; None -> d_in // 2
    dead_tokens: int = 10_000_000  # tokens without firing after which a latent is dead
    aux_coeff: float = 1 / 32  # AuxK loss coefficient

    ARCH: ClassVar[str] = "topk"
    LABEL: ClassVar[str] = "TopK"
    ORDER: ClassVar[int] = 0
    SAELENS_ARCH: ClassVar[str | None] = "topk"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate_auxk()


class TopKSAE(SAE):
    """Dense-encoder TopK SAE with sparse (embedding_bag) decode and AuxK."""

    cfg: TopKConfig

    def __init__(self, cfg: TopKConfig):
        super().__init__(cfg)
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.width))
        self.b_enc = nn.Parameter(torch.zeros(cfg.width))
        self.reset_parameters()

    def _init_encoder(self, gen: torch.Generator) -> None:
        """nn.Linear-style ``U(-1/sqrt(d), 1/sqrt(d))`` encoder, zero b_enc, W_dec = W_enc^T."""
        bound = 1.0 / math.sqrt(self.cfg.d_in)
        self.W_enc.uniform_(-bound, bound, generator=gen)
        self.b_enc.zero_()
        self._init_decoder_from_encoder(self.W_enc)

    def _encode_n(self, x_n_BD: Tensor) -> tuple[Encoding, dict[str, Tensor]]:
        # Same value as addmm(b_enc, x_n - b_dec, W_enc), but b_dec gets its gradient through
        # the [M] bias (-W_enc g.sum(0)) instead of a dense [B, M] x [M, d] matmul.
        b_dec_D = self.b_dec.detach()
        b_eff_M = self.b_enc + (b_dec_D - self.b_dec) @ self.W_enc.detach()  # value == b_enc
        x_c_BD = x_n_BD - b_dec_D
        aux_mask_M, k_aux = self._auxk_selection()
        sel = kernels.topk_linear(x_c_BD, self.W_enc, b_eff_M, self.cfg.k, aux_mask_M, k_aux)
        extras = {"aux_vals_BA": sel.vals_aux_BA, "aux_idx_BA": sel.idx_aux_BA} if k_aux else {}
        if sel.aux_rest:  # the AuxK selection is the main code plus these
            extras["aux_rest"] = sel.idx_aux_BA
        return Encoding(F.relu(sel.vals_BK), sel.idx_BK), extras

    def _aux_losses(
        self, x_n_BD: Tensor, x_hat_n_BD: Tensor, enc: Encoding, extras: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """``{"auxk": ...}`` in training mode with AuxK on (0 when no latent is dead)."""
        if not (self.training and self.cfg.auxk):
            return {}
        if "aux_idx_BA" not in extras:
            return {"auxk": x_n_BD.new_zeros(())}
        # every latent dead: the main code's share of e_hat is the main decode minus b_dec
        main_BD = x_hat_n_BD - self.b_dec if "aux_rest" in extras else None
        return {
            "auxk": kernels.auxk_loss(
                x_n_BD - x_hat_n_BD,
                extras["aux_vals_BA"],
                extras["aux_idx_BA"],
                self.W_dec,
                self.cfg.aux_coeff,
                partial_BD=main_BD,
            )
        }

    def saved_tensors(self) -> dict[str, Tensor]:
        return {**super().saved_tensors(), "W_enc": self.W_enc, "b_enc": self.b_enc}

    @torch.no_grad()
    def load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_saved_tensors(tensors)
        self.W_enc.copy_(tensors["W_enc"])
        self.b_enc.copy_(tensors["b_enc"])
