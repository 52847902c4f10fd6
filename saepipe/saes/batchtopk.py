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
is ``2 d M + 2 d k``. The code is the padded ``(acts_BL, idx_BL)`` of :func:`kernels.padded_code`
(``L`` = max per-token L0 in the batch, padding has ``acts = 0``; if a batch has fewer than
``k * B`` positive activations, the selected zeros stay in the code with ``acts = 0``).

Everything else is the TopK SAE's (subclass): unit-norm decoder rows (renormalised after each
step, parallel gradient removed), init, and Gao's AuxK on dead latents (``auxk``, ``k_aux``,
``dead_tokens``, ``aux_coeff``), here with a dense top-``k_aux`` over the dead latents.
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
        pre_BM = torch.addmm(self.b_enc, x_n_BD - self.b_dec, self.W_enc)
        f_BM = F.relu(pre_BM)
        B, M = f_BM.shape
        extras: dict[str, Tensor] = {}
        if self.training:
            n_sel = min(self.cfg.k * B, B * M)
            flat_S = f_BM.detach().reshape(-1).topk(n_sel, sorted=False).indices.sort().values
            rows_S, cols_S = flat_S // M, flat_S % M
            vals_S = f_BM.reshape(-1)[flat_S]
            self._update_threshold(vals_S.detach())
            acts_BL, idx_BL = kernels.pad_rows(rows_S, cols_S, vals_S, B)
            aux_mask_M, k_aux = self._auxk_selection()
            if k_aux and aux_mask_M is not None:
                vals_BA, idx_BA = pre_BM.masked_fill(~aux_mask_M, float("-inf")).topk(k_aux, dim=1)
                extras = {"aux_vals_BA": vals_BA, "aux_idx_BA": idx_BA}
        else:
            acts_BL, idx_BL = kernels.padded_code(f_BM, f_BM > self.threshold.clamp_min(0))
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

    def _saved_tensors(self) -> dict[str, Tensor]:
        return {**super()._saved_tensors(), "threshold": self.threshold}

    @torch.no_grad()
    def _load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        super()._load_saved_tensors(tensors)
        self.threshold.copy_(tensors["threshold"].reshape(()))
        self.threshold_updates.fill_(1)  # resumed training continues the EMA


__all__ = ["BatchTopKConfig", "BatchTopKSAE"]
