"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen, Nanda 2025, "Learning Multi-Level
Features with Matryoshka Sparse Autoencoders"; docs/reference.md §1).

Nested prefixes of the dictionary, ``m_1 < m_2 < ... < m_K = M`` (``matryoshka_widths``),
each reconstruct the input on their own, so the first latents must carry the general
features and later ones only refine them. Forward (normalised space,
``x_n = x * act_norm_factor``)::

    f = BatchTopK(ReLU(W_enc^T (x_n - b_dec) + b_enc))      # exactly BatchTopK's code (below)
    x_hat_i = b_dec + sum_{kept j < m_i} f_j W_dec[j]        # prefix i: latents [0, m_i) only
    loss = sum_i ||x_n - x_hat_i||^2 / d (mean over tokens)  + AuxK

``x_hat_K`` (all latents) is the SAE's reconstruction: ``forward`` returns it, ``decode`` and
evaluation use it, and it is the ``"mse"`` term of ``losses``; the inner prefixes add one term
each, ``"mse_<m_i>"`` (``mse_64``, ``mse_128``, ... for ``[64, 128, 256, 512]``), in the same
units, weight 1.

Loss normalisation: a SUM over the prefixes, as the paper's objective
(``L = sum_{m in M} ||x - x_hat_m||^2 + alpha L_aux``) and SAELens' ``matryoshka_batchtopk``
(its base loss is the full-width MSE and each inner level's MSE is added with weight 1).
dictionary_learning's
``MatryoshkaBatchTopKTrainer`` instead weights each level ``1 / K`` (its default
``group_weights``) and averages: a mean. With Adam the overall scale of the loss hardly matters;
what the choice fixes is (a) that ``"mse"`` stays the full reconstruction's MSE, the same
quantity as every other architecture's ``"mse"`` in ``train_log.jsonl``, and (b) the weight of
AuxK relative to the reconstruction terms: ``aux_coeff`` is against the full-width MSE, as in
BatchTopK and SAELens. One prefix (``matryoshka_widths: [M]``) is exactly BatchTopK.

Latent selection and inference threshold: BatchTopK's (subclass, no change): the top
``k * B`` entries of the whole batch in training (the prefixes share this one selection), the
running threshold (EMA of the smallest selected activation, ``threshold_momentum``) per token
at inference, saved as ``threshold``.

AuxK: BatchTopK's (Gao's) on the FULL reconstruction's residual ``x_n - x_hat_K``, with the
top-``k_aux`` dead latents of the whole dictionary (``auxk``, ``k_aux``, ``dead_tokens``,
``aux_coeff``): what dictionary_learning and SAELens (by default,
``use_matryoshka_aux_loss=False``) do. SAELens' optional per-level variant (each level's dead
latents fit that level's own residual) is not implemented: it needs a dead-latent search and
a decode per level.

Efficiency: the encoder, selection and sparse encoder backward are BatchTopK's. The nested
reconstructions cost ONE sparse decode, not K: the padded code lists each token's latents in
ascending order (BatchTopK's selection and the threshold's ``nonzero`` both give them so), so
the latents of prefix group ``g`` (``[m_{g-1}, m_g)``) are a contiguous run of each row. One
``F.embedding_bag`` whose bags are the ``(token, group)`` runs gives the ``[B, K, d]`` partial
sums (:class:`_GroupedDecode`, backward: embedding_bag's per-sample-weight gradient and
:func:`kernels.bag_weight_grad` with those bags), and a running sum over the ``K`` groups gives
every prefix's reconstruction. Measured on the CPU preset of bench/arch_speed.py (d=128, M=4096,
k=32, batch 4096, K=4 prefixes [M/8, M/4, M/2, M]; one thread, 40 interleaved rounds, medians, 2
cores shared with other jobs): BatchTopK 271 ms/step, Matryoshka 313 ms (+15%), the same with
one prefix 271 ms (the grouped decode itself costs nothing), and the straightforward way, one
masked sparse decode per prefix, 433 ms (+60%). The +15% is the K-1 inner squared errors and
their backward, and the 4x as many bags (a [B K, d] partial-sum matrix for the decode's weight
gradient to gather from). FLOPs per token and parameter count are the dense family's
(``2 d M + 2 d k``, ``2 d M + M + d``): the nested terms are loss arithmetic (``O(K d)`` per
token), which no architecture counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .base import Encoding
from .batchtopk import BatchTopKConfig, BatchTopKSAE


def default_widths(width: int) -> list[int]:
    """``[M/8, M/4, M/2, M]`` (integer division; repeats and zeros dropped for small M)."""
    return sorted({max(1, width >> s) for s in (3, 2, 1, 0)})


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    """Matryoshka BatchTopK hyper-parameters (plus BatchTopK's ``threshold_momentum`` and
    TopK's ``auxk``, ``k_aux``, ``dead_tokens``, ``aux_coeff``)."""

    matryoshka_widths: list[int] | None = None  # nested prefix sizes m_1 < ... < m_K = width; None: [M/8, M/4, M/2, M]

    ARCH: ClassVar[str] = "matryoshka"
    LABEL: ClassVar[str] = "Matryoshka"
    ORDER: ClassVar[int] = 7
    # (inherits BatchTopK's traits otherwise: L0 set by k, learned inference threshold)

    def __post_init__(self) -> None:
        super().__post_init__()
        widths = default_widths(self.width) if self.matryoshka_widths is None else self.matryoshka_widths
        example = default_widths(self.width)
        if (
            not isinstance(widths, (list, tuple))
            or not widths
            or not all(isinstance(m, int) and not isinstance(m, bool) for m in widths)
        ):
            raise ValueError(
                f"matryoshka_widths must be a non-empty list of ints (prefix sizes of the dictionary, "
                f"smallest first, the last = width), e.g. {example}, got {widths!r}"
            )
        widths = list(widths)
        if widths[0] < 1:
            raise ValueError(f"matryoshka_widths must be positive (a prefix has >= 1 latent), got {widths}")
        if any(a >= b for a, b in zip(widths, widths[1:])):
            raise ValueError(
                f"matryoshka_widths must be strictly increasing (each prefix nests in the next), got "
                f"{widths}; list each size once, smallest first, e.g. {sorted(set(widths))}"
            )
        if widths[-1] != self.width:
            fix = (
                f"append {self.width}"
                if widths[-1] < self.width
                else f"drop the sizes above {self.width} and end at {self.width}"
            )
            raise ValueError(
                f"matryoshka_widths must end at width={self.width} (the whole dictionary is the last "
                f"prefix), got {widths}; {fix}"
            )
        self.matryoshka_widths = widths


class _GroupedDecode(torch.autograd.Function):
    """``P[n] = sum_{entries e of bag n} acts_e W[idx_e]`` for bags that are contiguous runs of
    the row-major ``(idx_BL, acts_BL)`` (``offsets_N``: start of each bag; ``bag_BL``: each
    entry's bag). W gradient by :func:`kernels.bag_weight_grad` (a transposed embedding_bag)."""

    @staticmethod
    def forward(ctx, idx_BL, acts_BL, W_MD, bag_BL, offsets_N):
        ctx.save_for_backward(idx_BL, acts_BL, W_MD, bag_BL, offsets_N)
        return F.embedding_bag(idx_BL.reshape(-1), W_MD, offsets_N, per_sample_weights=acts_BL.reshape(-1), mode="sum")

    @staticmethod
    def backward(ctx, g_ND):
        idx_BL, acts_BL, W_MD, bag_BL, offsets_N = ctx.saved_tensors
        g_acts = g_W = None
        if ctx.needs_input_grad[1]:  # embedding_bag's per-sample-weight gradient, W held fixed
            g_S = kernels.bag_acts_grad(g_ND.to(W_MD.dtype), W_MD, idx_BL.reshape(-1), offsets_N, bag_BL.reshape(-1))
            g_acts = g_S.view_as(acts_BL)
        if ctx.needs_input_grad[2]:
            g_W = kernels.bag_weight_grad(idx_BL, acts_BL, g_ND.to(W_MD.dtype), W_MD.shape[0], bag_BL)
        return None, g_acts, g_W, None, None


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK whose nested dictionary prefixes each reconstruct the input (summed losses)."""

    cfg: MatryoshkaConfig
    group_starts: Tensor  # buffer [K - 1], long, not saved: m_1 ... m_{K-1} (first latent of groups 2..K)

    def __init__(self, cfg: MatryoshkaConfig):
        super().__init__(cfg)
        assert cfg.matryoshka_widths is not None  # resolved by the config
        self.register_buffer(
            "group_starts", torch.tensor(cfg.matryoshka_widths[:-1], dtype=torch.long), persistent=False
        )

    def _encode_decode_n(self, x_n_BD: Tensor) -> tuple[Encoding, dict[str, Tensor], Tensor]:
        """BatchTopK's code; every prefix's reconstruction from one grouped decode (module doc).
        ``extras["inner_mse"]``: ``[K - 1]``, the inner prefixes' MSEs (the full one is ``"mse"``)."""
        enc, extras = self._encode_n(x_n_BD)
        assert enc.acts_BK is not None and enc.idx_BK is not None
        parts = self._group_partials(enc.acts_BK, enc.idx_BK).unbind(1)  # K x [B, d]
        r_BD = x_n_BD - self.b_dec  # residual of the growing prefix, running through the groups
        inner = []
        for part_BD in parts[:-1]:
            r_BD = r_BD - part_BD
            inner.append(r_BD.pow(2).mean())
        x_hat_n_BD = self.b_dec + sum(parts[1:], parts[0])
        if inner:
            extras = {**extras, "inner_mse": torch.stack(inner)}
        return enc, extras, x_hat_n_BD

    def _group_partials(self, acts_BL: Tensor, idx_BL: Tensor) -> Tensor:
        """``[B, K, d]``: each token's decode restricted to each group ``[m_{g-1}, m_g)``.

        A row's real entries have ascending indices, its padding (``idx 0``, ``act 0``) comes
        after them: groups are contiguous runs, and padding joins the last group."""
        B, L = idx_BL.shape
        G = self.group_starts.numel() + 1
        group_BL = torch.bucketize(idx_BL, self.group_starts, right=True)
        padding_BL = (idx_BL == 0) & (torch.arange(L, device=idx_BL.device) > 0)
        group_BL.masked_fill_(padding_BL, G - 1)
        bag_BL = group_BL + G * torch.arange(B, device=idx_BL.device)[:, None]
        counts_N = torch.bincount(bag_BL.reshape(-1), minlength=B * G)
        offsets_N = counts_N.cumsum(0) - counts_N
        partial_ND = _GroupedDecode.apply(idx_BL, acts_BL.to(self.W_dec.dtype), self.W_dec, bag_BL, offsets_N)
        return partial_ND.view(B, G, -1)

    def _aux_losses(
        self, x_n_BD: Tensor, x_hat_n_BD: Tensor, enc: Encoding, extras: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """``{"mse_<m_i>": ...}`` for the inner prefixes (weight 1, the units of ``"mse"``), then
        BatchTopK's AuxK on the full residual."""
        widths = self.cfg.matryoshka_widths
        assert widths is not None
        inner = extras["inner_mse"].unbind() if "inner_mse" in extras else ()
        return {
            **{f"mse_{m}": term for m, term in zip(widths, inner)},
            **super()._aux_losses(x_n_BD, x_hat_n_BD, enc, extras),
        }


__all__ = ["MatryoshkaConfig", "MatryoshkaSAE", "default_widths"]
