"""BatchTopK SAE (Bussmann, Leask, Nanda 2024; docs/reference.md §1).

Forward (normalised space, ``x_n = x * act_norm_factor``)::

    f = ReLU(W_enc^T (x_n - b_dec) + b_enc)                      # [B, M], dense encoder
    training:  keep the top (k * B) entries of f over the WHOLE batch (per-token L0 varies,
               mean k); update the threshold estimate (below)
    inference: keep f_j where f_j > threshold                    # per-token, batch independent
    x_hat_n = b_dec + sum_kept f_j W_dec[j]                       # one F.embedding_bag

``threshold`` (a scalar buffer, saved as the 0-dim tensor ``threshold``) is the running
estimate of the smallest selected activation: after every training forward,
``m = min over selected entries with f > 0``; the first update sets ``threshold = m``, later
ones ``threshold += threshold_momentum * (m - threshold)`` (EMA). Before any training update
it is 0, i.e. eval-mode inference is a plain ReLU SAE. Call ``sae.eval()`` for inference.

``k`` = average active latents per token: exactly ``k * B`` entries are selected per training
batch (fewer are > 0 only if the batch has fewer positive pre-activations); the FLOP estimate
is ``2 d M + 2 d k``. The code is padded ``(acts_BL, idx_BL)`` (``L`` = max per-token L0 in
the batch, padding has ``acts = 0``, ``idx = 0``; if a batch has fewer than ``k * B``
positive activations, the selected zeros stay in the code with ``acts = 0``).

Efficiency: the batch-wide selection is :func:`kernels.batch_topk` (a sampled threshold, then
a top-k over the few entries above it; exact), the encoder backward is sparse
(:func:`kernels.gather_linear`: only the selected entries reach ``W_enc`` / ``b_enc``), the
decode one embedding_bag. The dense ``[B, M]`` pre-activations are a reused scratch buffer.

Everything else is the TopK SAE's (subclass): unit-norm decoder rows (renormalised after each
step, parallel gradient removed), init, and Gao's AuxK on dead latents (``auxk``, ``k_aux``,
``dead_tokens``, ``aux_coeff``): the top-``k_aux`` dead latents per token
(:func:`kernels.dead_topk`) with the same sparse backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .base import Encoding
from .topk import TopKConfig, TopKSAE


@dataclass
class BatchTopKConfig(TopKConfig):
    """BatchTopK hyper-parameters (plus TopK's ``auxk``, ``k_aux``, ``dead_tokens``, ``aux_coeff``).

    ``k``: average active latents per token (``k * batch`` selected per training batch).
    """

    threshold_momentum: float = 0.01  # EMA rate of the inference threshold (1 = last batch only)

    ARCH: ClassVar[str] = "batchtopk"
    LABEL: ClassVar[str] = "BatchTopK"
    ORDER: ClassVar[int] = 1
    HAS_THRESHOLD: ClassVar[bool] = True
    SAELENS_ARCH: ClassVar[str | None] = "jumprelu"  # inference keeps f > threshold: a JumpReLU
    # (inherits TopK's traits otherwise)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.threshold_momentum <= 1:
            raise ValueError(f"threshold_momentum must be in (0, 1], got {self.threshold_momentum!r}")


class BatchTopKSAE(TopKSAE):
    """BatchTopK in training, learned global threshold at inference."""

    cfg: BatchTopKConfig
    threshold: Tensor  # buffer []: the inference threshold (running estimate)
    threshold_updates: Tensor  # buffer [], long: training steps that updated it

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "threshold"):
            self.threshold.zero_()
            self.threshold_updates.zero_()

    def _encode_n(self, x_n_BD: Tensor) -> tuple[Encoding, dict[str, Tensor]]:
        x_c_BD, b_eff_M = kernels.centred_input(x_n_BD, self.b_dec, self.W_enc, self.b_enc)
        # f = ReLU(pre), a scratch buffer: its gathered entries have pre's ReLU gradient
        f_BM = kernels.matmul_bias(x_c_BD, self.W_enc, b_eff_M, kernels.SCRATCH).relu_()
        B, M = f_BM.shape
        extras: dict[str, Tensor] = {}
        if self.training:
            rows_S, cols_S, vals_S = kernels.batch_topk(f_BM, min(self.cfg.k * B, B * M))
            self._update_threshold(vals_S)
            idx_BL, valid_BL = kernels.padded_entries(rows_S, cols_S, B)
        else:
            idx_BL, valid_BL = kernels.padded_indices(f_BM > self.threshold.clamp_min(0))
        acts_BL = F.relu(kernels.gather_linear(x_c_BD, self.W_enc, b_eff_M, f_BM, idx_BL, valid_BL)) * valid_BL
        aux_mask_M, k_aux = self._auxk_selection()
        if k_aux and aux_mask_M is not None:  # (overwrites f_BM's live columns when many are dead)
            _, idx_BA = kernels.dead_topk(f_BM, aux_mask_M, int(aux_mask_M.sum()), k_aux)
            all_BA = torch.ones(idx_BA.shape, dtype=torch.bool, device=idx_BA.device)
            vals_BA = kernels.gather_linear(x_c_BD, self.W_enc, b_eff_M, f_BM, idx_BA, all_BA)
            extras = {"aux_vals_BA": vals_BA, "aux_idx_BA": idx_BA}
        kernels.SCRATCH.give(f_BM)  # only gathered from: no reference left
        return Encoding(acts_BL, idx_BL), extras

    @torch.no_grad()
    def _update_threshold(self, vals_S: Tensor) -> None:
        """EMA of the smallest selected positive activation (first update sets it)."""
        pos_S = vals_S[vals_S > 0]
        if pos_S.numel() == 0:
            return
        m = pos_S.min().to(self.threshold.dtype)
        if int(self.threshold_updates) == 0:
            self.threshold.copy_(m)
        else:
            self.threshold.lerp_(m, self.cfg.threshold_momentum)
        self.threshold_updates.add_(1)

    def saved_tensors(self) -> dict[str, Tensor]:
        return {**super().saved_tensors(), "threshold": self.threshold}

    @torch.no_grad()
    def load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_saved_tensors(tensors)
        self.threshold.copy_(tensors["threshold"].reshape(()))
        self.threshold_updates.fill_(1)  # resumed training continues the EMA


__all__ = ["BatchTopKConfig", "BatchTopKSAE"]
