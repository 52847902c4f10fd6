"""Shared compute kernels for the SAE architectures (pure torch).

Sparse codes (docs/reference.md §4):

- :func:`sparse_decode` - one ``F.embedding_bag`` over GLOBAL latent indices; never builds a
  dense ``[B, M]`` code. Its weight gradient is :func:`bag_weight_grad`, a transposed
  embedding_bag (9x faster on CPU than embedding_bag's own backward).
- :func:`topk_linear` - dense encoder ``x W + b`` followed by TopK (and Gao's AuxK selection
  of dead latents) whose backward is sparse: only the selected ``B x k`` entries reach
  ``W`` / ``b``, never a dense ``[B, M]`` gradient. :func:`dead_topk`: AuxK's selection from a
  whole ``[B, M]`` matrix (BatchTopK's).
- :func:`gather_linear` - the same sparse backward for entries chosen from a precomputed
  ``pre = x W + b`` (BatchTopK's :func:`batch_topk`, the active set of a ReLU code);
  :func:`centred_input` gives ``b_dec`` its encoder gradient through an ``[M]`` bias.
- :func:`pad_rows` / :func:`padded_code` / :func:`padded_indices` / :func:`compact_code` -
  padded ``(acts_BL, idx_BL)`` codes for variable-L0 architectures (L = max active latents of
  any row; padding acts 0, idx 0); :func:`code_is_wide` picks their dense training path
  (:mod:`saepipe.saes.dense_code`) when most latents fire.
- :func:`auxk_loss` - Gao et al.'s normalised AuxK term from the selected dead latents (every
  TopK-family SAE: TopK, BatchTopK, Switch, Scale).

Other:

- :func:`grouped_mm` - one grouped matmul of token rows sorted by expert against per-expert
  weights (``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``), with a per-expert loop
  fallback for old torch or shapes the kernel cannot take (strides not 16-byte aligned).
- :class:`ScratchPool` / :func:`matmul_bias` - reused CPU buffers for ``[B, M]`` temporaries.
- :func:`geometric_median` - Weiszfeld iterations (<= 100) for the data-dependent bias init.
- :func:`normalise_rows_` / :func:`remove_parallel_grad_` - unit-norm decoder-row helpers.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ScratchPool",
    "SCRATCH",
    "sparse_decode",
    "bag_acts_grad",
    "bag_weight_grad",
    "pad_rows",
    "padded_code",
    "padded_indices",
    "padded_entries",
    "compact_code",
    "code_is_wide",
    "decode",
    "topk_linear",
    "TopKSelection",
    "dead_topk",
    "row_topk",
    "batch_topk",
    "gather_linear",
    "centred_input",
    "matmul_bias",
    "grouped_mm",
    "grouped_mm_available",
    "sort_by_expert",
    "auxk_loss",
    "geometric_median",
    "normalise_rows_",
    "remove_parallel_grad_",
]

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_available() -> bool:
    """True when this torch has a native grouped matmul (otherwise the loop fallback runs)."""
    return _GROUPED_MM is not None


class ScratchPool:
    """Reusable buffers for the large temporaries of one kernel call (CPU only).

    On CPU a fresh ``[B, M]`` float tensor (64 MB in the CPU preset) is mapped page by page on
    first touch: about 30 ms, as long as a ``[B, d] x [d, M]`` matmul filling it (measured,
    d=128, M=B=4096, one thread: ``torch.mm`` 73 ms into a new tensor, 47 ms into a reused
    one). A kernel whose buffer never leaves the call (the TopK pre-activations, a gradient
    inside a backward) takes one here and gives it back before returning; nothing that is
    returned, saved for backward or viewed elsewhere may be given back. Other devices have a
    caching allocator: ``take`` allocates there. At most ``max_buffers`` are kept.
    """

    def __init__(self, max_buffers: int = 4):
        self.max_buffers = max_buffers
        self._free: list[Tensor] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of that shape, dtype and device (reused when one is free)."""
        if torch.device(device).type == "cpu":
            with self._lock:
                for i, t in enumerate(self._free):
                    if t.shape == shape and t.dtype == dtype:
                        return self._free.pop(i)
        return torch.empty(shape, dtype=dtype, device=device)

    def give(self, t: Tensor) -> None:
        """Return a buffer from :meth:`take` (no other reference to it may remain in use)."""
        if t.device.type == "cpu" and t.is_contiguous():
            with self._lock:
                self._free.append(t)
                del self._free[: -self.max_buffers]


SCRATCH = ScratchPool()
"""The pool of the kernels in saepipe.saes (:class:`ScratchPool`)."""


def sparse_decode(idx_BK: Tensor, acts_BK: Tensor, W_dec_MD: Tensor) -> Tensor:
    """Return ``sum_j acts_BK[b, j] * W_dec_MD[idx_BK[b, j]]`` as ``[B, D]`` (no decoder bias).

    Forward: one ``F.embedding_bag(mode="sum", per_sample_weights=...)`` call, cost
    ``2 * D * K`` per token. Backward (:class:`_SparseDecode`): the ``acts`` gradient is
    embedding_bag's own per-sample-weight gradient; the ``W_dec`` gradient is
    :func:`bag_weight_grad` (a transposed embedding_bag) instead of embedding_bag's backward,
    which stable-sorts the indices and accumulates row by row: 9x faster on CPU (d=128,
    M=4096, B=4096, K=32: 31 ms instead of 277 ms, best of 15 interleaved runs).
    """
    return _SparseDecode.apply(idx_BK, acts_BK.to(W_dec_MD.dtype), W_dec_MD)


class _SparseDecode(torch.autograd.Function):
    """``embedding_bag`` sum with per-sample weights; W gradient by :func:`bag_weight_grad`."""

    @staticmethod
    def forward(ctx, idx_BK, acts_BK, W_MD):
        ctx.save_for_backward(idx_BK, acts_BK, W_MD)
        return F.embedding_bag(idx_BK, W_MD, per_sample_weights=acts_BK, mode="sum")

    @staticmethod
    def backward(ctx, g_BD):
        idx_BK, acts_BK, W_MD = ctx.saved_tensors
        g_acts = g_W = None
        if ctx.needs_input_grad[1]:  # embedding_bag's per-sample-weight gradient, W held fixed
            B, K = idx_BK.shape
            bag_S = torch.arange(B, device=idx_BK.device).repeat_interleave(K)
            offsets_B = torch.arange(0, B * K, K, device=idx_BK.device)
            g_acts = bag_acts_grad(g_BD.to(W_MD.dtype), W_MD, idx_BK.reshape(-1), offsets_B, bag_S).view(B, K)
        if ctx.needs_input_grad[2]:
            g_W = bag_weight_grad(idx_BK, acts_BK, g_BD.to(W_MD.dtype), W_MD.shape[0])
        return None, g_acts, g_W


def bag_acts_grad(g_ND: Tensor, W_MD: Tensor, idx_S: Tensor, offsets_N: Tensor, bag_S: Tensor) -> Tensor:
    """``[S]``: ``g_ND[bag_S[s]] . W_MD[idx_S[s]]``, the gradient w.r.t. ``per_sample_weights`` of
    ``F.embedding_bag(idx_S, W_MD, offsets_N, per_sample_weights=..., mode="sum")`` given the
    output's gradient ``g_ND`` (``bag_S``: each entry's bag, from ``offsets_N``).

    ATen's kernel for it, called directly, as embedding_bag's own backward calls it (the same
    values, bit for bit): going through autograd would first rerun the forward (d=128, B=4096,
    K=32 on 2 CPU threads: 1.9 ms instead of 3.0)."""
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(g_ND, W_MD, idx_S, offsets_N, bag_S, 0)


def _sort_dtype(n: int) -> torch.dtype:
    """The narrowest integer dtype holding ``0 .. n - 1`` (int16 or int32): the key dtype of
    :func:`bag_weight_grad`'s sort by latent (CPU, 262k keys below 4096: int64 1.9 ms, int32
    1.3 ms, int16 1.0 ms)."""
    return torch.int16 if n <= 2**15 else torch.int32


def bag_weight_grad(idx_BK: Tensor, w_BK: Tensor, grad_BD: Tensor, n_rows: int, bag_BK: Tensor | None = None) -> Tensor:
    """``G[m] = sum_{(b, j): idx[b, j] = m} w[b, j] * grad[b]`` as ``[n_rows, D]``.

    The weight gradient of ``embedding_bag`` (and of a sparse encoder), computed as a
    transposed embedding_bag: the ``B * K`` entries are sorted by latent (one unstable sort)
    and bag ``m`` sums the ``grad`` rows of the tokens that selected latent ``m``. Entries
    with ``w = 0`` (padding) add nothing. ``bag_BK`` (optional, long, shaped like ``idx_BK``):
    the row of ``grad_BD`` each entry takes instead of its own row ``b`` (an embedding_bag
    whose bags are not the rows of ``idx_BK``, e.g. Matryoshka's per-prefix partial decodes).
    """
    K = idx_BK.shape[1]
    flat_S = idx_BK.reshape(-1)
    order_S = flat_S.to(_sort_dtype(n_rows)).argsort()  # narrow keys sort faster (CPU: 1.5-2x)
    counts_M = torch.bincount(flat_S, minlength=n_rows)
    offsets_M = counts_M.cumsum(0) - counts_M
    w_S = w_BK.reshape(-1).to(grad_BD.dtype).index_select(0, order_S)
    rows_S = order_S // K if bag_BK is None else bag_BK.reshape(-1).index_select(0, order_S)
    return F.embedding_bag(rows_S, grad_BD, offsets_M, per_sample_weights=w_S, mode="sum")


def autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` runs in here: autocast's where it is on, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def matmul_bias(
    x_BD: Tensor, W_DM: Tensor, b_M: Tensor | None, pool: ScratchPool | None = None, out_BM: Tensor | None = None
) -> Tensor:
    """``x W (+ b)`` without autograd into ``out_BM`` (contiguous, of :func:`autocast_dtype`) or a
    new or pooled (``pool.take``) buffer; under autocast in its dtype. ``torch.addmm`` would
    first copy the broadcast bias into the output (an extra ``[B, M]`` pass); here the matmul
    writes the output and the bias is added in place."""
    device = x_BD.device
    dtype = autocast_dtype(x_BD)
    if out_BM is None and pool is not None:
        out_BM = pool.take((x_BD.shape[0], W_DM.shape[1]), dtype, device)
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        out_BM = torch.mm(x_BD.to(dtype), W_DM.to(dtype), out=out_BM)
        if b_M is not None:
            out_BM += b_M.to(dtype)
    return out_BM


def _sparse_linear_grads(
    needs_input_grad: tuple[bool, ...], x_BD: Tensor, W_DM: Tensor, idx_BJ: Tensor, g_BJ: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients w.r.t. ``(x, W, b)`` of ``pre[b, idx_BJ[b, j]]`` with ``pre = x W + b``, given
    the upstream gradient ``g_BJ`` of those entries only (0 where an entry must not count).

    ``O(B J D)``: ``grad_x = sum_j g_j W[:, idx_j]`` (one embedding_bag), ``grad_W`` by
    :func:`bag_weight_grad`, ``grad_b`` by one ``index_add_``; never a dense ``[B, M]`` tensor.
    """
    g_BJ = g_BJ.to(W_DM.dtype)
    M = W_DM.shape[1]
    grad_x = grad_W = grad_b = None
    if needs_input_grad[0]:
        W_MD = W_DM.t().contiguous()
        grad_x = F.embedding_bag(idx_BJ, W_MD, per_sample_weights=g_BJ, mode="sum").to(x_BD.dtype)
    if needs_input_grad[1]:
        grad_W = bag_weight_grad(idx_BJ, g_BJ, x_BD.to(W_DM.dtype), M).t()
    if needs_input_grad[2]:
        grad_b = torch.zeros(M, dtype=W_DM.dtype, device=W_DM.device)
        grad_b.index_add_(0, idx_BJ.reshape(-1), g_BJ.reshape(-1))
    return grad_x, grad_W, grad_b


ROW_TOPK_BLOCK = 8
"""Columns per block of :func:`row_topk`'s CPU search (strided: column j is in block j % (M / 8));
4 where 8 would leave too few blocks (:func:`_row_topk_block`). Callers that pad a part of
a row for it (:func:`_columns_block`) pad to whole blocks of this size."""


def _row_topk_block(M: int, k: int) -> int | None:
    """The block size of :func:`row_topk` for a row of ``M`` columns and a top-``k``: the larger
    of 8 and 4 dividing ``M`` that leaves at least ``4 k`` blocks, else None (torch.topk).
    Measured (2 CPU threads, B = 4096, float32; torch.topk -> blocked): M = 4096, k = 64:
    37.7 -> 25.6 ms (8 columns); M = 1232, k = 64: 19.5 -> 14.4 ms (4; 8 leaves 154 blocks,
    below 4 k); M = 512, k = 32: 8.7 -> 6.5 ms (4). Blocks of 2 or fewer than 4 k blocks lose
    (M = 512, k = 64, 2 columns: 13.5 vs 9.3 ms)."""
    for size in (ROW_TOPK_BLOCK, ROW_TOPK_BLOCK // 2):
        if M % size == 0 and M // size >= 4 * k:
            return size
    return None


def row_topk(f_BM: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``f_BM.topk(k, dim=1, sorted=False)``: the same values and latents per row (ties broken
    arbitrarily, as torch's), faster on the CPU for a wide row.

    On the CPU, the row is cut into ``n`` strided blocks of ``R`` columns (block b = columns
    b, b + n, ..., b + (R - 1) n; ``R`` = 8 or 4 with ``n >= 4 k``, :func:`_row_topk_block`);
    only the ``k`` blocks with the largest maxima are searched (``R k`` columns). Exact: every
    top-k entry e lies in a block whose maximum is >= e >= the k-th largest entry >= the k-th
    largest block maximum (k blocks each hold an entry at least that large). One vectorised
    max over the blocks and two small top-k's replace torch's per-row heap over all M columns,
    whose cost grows with k. Measured on 2 CPU threads, B = M = 4096 (float32): k = 32 about
    19 ms instead of 22, k = 64 about 26 ms instead of 38. Elsewhere (CUDA, narrow rows):
    ``torch.topk``.
    """
    B, M = f_BM.shape
    R = _row_topk_block(M, k) if f_BM.device.type == "cpu" and f_BM.is_contiguous() else None
    if R is None:
        return f_BM.topk(k, dim=1, sorted=False)
    n = M // R
    f_BRn = f_BM.view(B, R, n)
    blk_BK = f_BRn.amax(1).topk(k, dim=1, sorted=False).indices
    cand_BC = f_BRn.gather(2, blk_BK.unsqueeze(1).expand(B, R, k)).view(B, R * k)
    vals_BK, pos_BK = cand_BC.topk(k, dim=1, sorted=False)
    return vals_BK, blk_BK.gather(1, pos_BK % k) + n * torch.div(pos_BK, k, rounding_mode="floor")


# AuxK over at most this fraction of the latents gathers their pre-activation columns
# ([B, n_dead] copy) before its top-k; more dead latents: the dead mask is applied in place.
AUX_GATHER_MAX_FRACTION = 1 / 4


def dead_topk(pre_BM: Tensor, dead_M: Tensor, n_dead: int, k_aux: int) -> tuple[Tensor, Tensor]:
    """``(vals_BA, idx_BA)``: the top-``k_aux`` of ``pre_BM`` per row among the ``n_dead`` columns
    of ``dead_M`` (bool ``[M]``; unsorted). Few dead (<= ``AUX_GATHER_MAX_FRACTION``): only
    their columns are gathered and searched; else the live columns of ``pre_BM`` are
    overwritten with -inf (the caller's buffer) and the whole row searched."""
    if n_dead <= pre_BM.shape[1] * AUX_GATHER_MAX_FRACTION:
        dead_A = dead_M.nonzero().squeeze(1)
        vals_BA, pos_BA = pre_BM.index_select(1, dead_A).topk(k_aux, dim=1, sorted=False)
        return vals_BA, dead_A[pos_BA]
    pre_BM.masked_fill_(~dead_M, float("-inf"))
    return row_topk(pre_BM, k_aux)


def _columns_block(x_BD: Tensor, W_DM: Tensor, b_M: Tensor, cols_C: Tensor, flat: Tensor) -> Tensor:
    """``x W[:, cols] + b[cols]`` as a contiguous ``[B, C']`` view at the start of ``flat``, ``C'``
    = ``C`` rounded up to whole :data:`ROW_TOPK_BLOCK` blocks; the extra columns are set to -inf
    (whatever ``x`` holds, NaN included), so :func:`row_topk` can search it in blocks and a
    top-n with n <= C never selects them (torch.topk ranks NaN above everything)."""
    C = cols_C.numel()
    pad = -C % ROW_TOPK_BLOCK
    out_BC = flat[: x_BD.shape[0] * (C + pad)].view(x_BD.shape[0], C + pad)
    W_DC, b_C = F.pad(W_DM.index_select(1, cols_C), (0, pad)), F.pad(b_M.index_select(0, cols_C), (0, pad))
    out_BC = matmul_bias(x_BD, W_DC, b_C, out_BM=out_BC)
    out_BC[:, C:] = float("-inf")
    return out_BC


def _top_of(vals_BJ: Tensor, idx_BJ: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The ``n`` largest of a selection ``(vals_BJ, idx_BJ)`` (all of it when ``n`` = J)."""
    if n == vals_BJ.shape[1]:
        return vals_BJ, idx_BJ
    vals_BN, pos_BN = vals_BJ.topk(n, dim=1, sorted=False)
    return vals_BN, idx_BJ.gather(1, pos_BN)


def _split_topk(
    x_BD: Tensor, W_DM: Tensor, b_M: Tensor, k: int, dead_M: Tensor, n_dead: int, k_aux: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(vals_BK, idx_BK, vals_aux_BA, idx_aux_BA)`` of :func:`topk_linear` when some but not
    all latents are dead: the encoder matmul in two parts, the dead columns and the live ones
    (each a contiguous block of one scratch buffer), searched separately, ONE search per
    column: the top-``max(k, k_aux)`` of the dead part gives AuxK's selection; the code is the
    top-k of it and the live part's top-k together.
    A top-k of the whole row plus a second search over its dead columns would search the dead
    columns twice."""
    B, M = x_BD.shape[0], W_DM.shape[1]
    dead_A, live_L = dead_M.nonzero().squeeze(1), (~dead_M).nonzero().squeeze(1)
    flat = SCRATCH.take((B * (M + 2 * ROW_TOPK_BLOCK),), autocast_dtype(x_BD), x_BD.device)
    J = min(n_dead, max(k, k_aux))
    pre_BA = _columns_block(x_BD, W_DM, b_M, dead_A, flat)
    vals_BJ, pos_BJ = row_topk(pre_BA, J)  # J <= n_dead: never a padding column
    idx_BJ = dead_A[pos_BJ]
    vals_aux_BA, idx_aux_BA = _top_of(vals_BJ, idx_BJ, k_aux)
    pre_BL = _columns_block(x_BD, W_DM, b_M, live_L, flat[pre_BA.numel() :])
    live_vals, live_pos = row_topk(pre_BL, min(k, M - n_dead))
    # the dead part's top-k is among its top-J (J >= min(k, n_dead)): one top-k of both parts
    vals_BK, idx_BK = _top_of(torch.cat([vals_BJ, live_vals], 1), torch.cat([idx_BJ, live_L[live_pos]], 1), k)
    SCRATCH.give(flat)
    return vals_BK, idx_BK, vals_aux_BA, idx_aux_BA


class TopKSelection(NamedTuple):
    """What :func:`topk_linear` selects (values are raw pre-activations: apply ReLU outside)."""

    vals_BK: Tensor  # the top-k pre-activations per row
    idx_BK: Tensor  # their latents
    vals_aux_BA: Tensor  # AuxK: the top-k_aux dead latents' pre-activations ([B, 0] without AuxK), or
    #   with ``aux_rest`` only the ``k_aux - k`` of them beyond the main code
    idx_aux_BA: Tensor  # their latents
    aux_rest: bool  # True: every latent is dead and k_aux > k, so the AuxK selection is the main
    #   top-k plus ``vals_aux_BA``; the caller adds the main code's share (e.g. from its decode)


class _TopKLinear(torch.autograd.Function):
    """``pre = x W + b``; ``(vals, idx) = topk(pre, k)`` [+ the top-``k_aux`` dead latents];
    the backward reaches only the selected entries (:func:`_sparse_linear_grads`)."""

    @staticmethod
    def forward(ctx, x_BD, W_DM, b_M, k, aux_mask_M, k_aux, n_dead):
        ctx.aux_in_main = False
        if 0 < n_dead < W_DM.shape[1]:  # some dead: dead and live columns searched apart
            vals_BK, idx_BK, vals_aux_BA, idx_aux_BA = _split_topk(x_BD, W_DM, b_M, k, aux_mask_M, n_dead, k_aux)
            idx_BJ = torch.cat([idx_BK, idx_aux_BA], dim=1)
        else:
            pre_BM = matmul_bias(x_BD, W_DM, b_M, SCRATCH)
            if n_dead:
                # Every latent dead: the top-k and the top-k_aux are nested. ONE search for the
                # larger, sorted; the smaller is its first columns. k_aux > k: the aux outputs
                # are the rest (columns k..k_aux), so the backward visits each entry once.
                vals_BJ, idx_BJ = row_topk(pre_BM, max(k, k_aux))
                vals_BJ, order_BJ = vals_BJ.sort(dim=1, descending=True)
                idx_BJ = idx_BJ.gather(1, order_BJ)
                if k_aux > k:
                    vals_BK, idx_BK = vals_BJ[:, :k].contiguous(), idx_BJ[:, :k].contiguous()
                    vals_aux_BA, idx_aux_BA = vals_BJ[:, k:].contiguous(), idx_BJ[:, k:].contiguous()
                else:
                    vals_BK, idx_BK = vals_BJ, idx_BJ
                    vals_aux_BA, idx_aux_BA = vals_BJ[:, :k_aux].clone(), idx_BJ[:, :k_aux].clone()
                    ctx.aux_in_main = True
            else:
                vals_BK, idx_BK = row_topk(pre_BM, k)
                vals_aux_BA, idx_aux_BA = vals_BK[:, :0].clone(), idx_BK[:, :0].clone()
                idx_BJ = idx_BK
            SCRATCH.give(pre_BM)
        ctx.save_for_backward(x_BD, W_DM, idx_BJ)
        ctx.mark_non_differentiable(idx_BK, idx_aux_BA)
        return vals_BK, idx_BK, vals_aux_BA, idx_aux_BA

    @staticmethod
    def backward(ctx, g_vals_BK, _g_idx, g_aux_BA, _g_idx_aux):
        x_BD, W_DM, idx_BJ = ctx.saved_tensors
        if ctx.aux_in_main:  # the aux selection is the first columns of the main one
            g_BJ = g_vals_BK.clone()
            g_BJ[:, : g_aux_BA.shape[1]] += g_aux_BA.to(g_BJ.dtype)
        else:
            g_BJ = torch.cat([g_vals_BK, g_aux_BA.to(g_vals_BK.dtype)], dim=1)
        return *_sparse_linear_grads(ctx.needs_input_grad, x_BD, W_DM, idx_BJ, g_BJ), None, None, None, None


def topk_linear(
    x_BD: Tensor,
    W_DM: Tensor,
    b_M: Tensor,
    k: int,
    aux_mask_M: Tensor | None = None,
    k_aux: int = 0,
) -> TopKSelection:
    """TopK of the pre-activations ``x_BD @ W_DM + b_M`` with a sparse backward.

    Returns a :class:`TopKSelection`: the top-``k`` values/indices and, when ``aux_mask_M``
    (bool ``[M]``) and ``k_aux > 0`` are given, the top-``k_aux`` among the masked latents
    (``k_aux`` must not exceed the mask's count; else empty ``[B, 0]``) or, when every latent
    is masked and ``k_aux > k``, only the ``k_aux - k`` of them beyond the top-``k``
    (``aux_rest``). Values are raw pre-activations (apply ReLU outside). Gradients w.r.t.
    ``x``, ``W``, ``b`` equal those of the dense formulation but cost ``O(B (k + k_aux) D)``.

    AuxK selection (Gao's dead latents), the cheapest exact way for the dead count: none dead,
    nothing; every latent dead, ONE sorted top-``max(k, k_aux)`` search whose first columns
    are the smaller selection (with ``aux_rest``, the caller reuses its main decode for the
    shared part: only the rest is decoded again); some dead, the encoder matmul in two parts,
    dead and live columns, each searched once (:func:`_split_topk`): the dead part's top
    ``max(k, k_aux)`` gives AuxK's selection and its share of the code. The pre-activations
    live in a reused scratch buffer (:data:`SCRATCH`). Measured (CPU preset of
    bench/arch_speed.py, k=32, k_aux=64): the "topk_auxk_*" rows of
    bench/results/arch_speed-*.json.
    """
    n_dead = int(aux_mask_M.sum()) if aux_mask_M is not None and k_aux > 0 else 0  # a host sync
    vals_BK, idx_BK, vals_aux_BA, idx_aux_BA = _TopKLinear.apply(x_BD, W_DM, b_M, k, aux_mask_M, k_aux, n_dead)
    aux_rest = n_dead == W_DM.shape[1] and k_aux > k
    return TopKSelection(vals_BK, idx_BK, vals_aux_BA, idx_aux_BA, aux_rest)


BATCH_TOPK_SAMPLE = 1 << 18  # entries sampled to place the threshold of :func:`batch_topk`


def batch_topk(f_BM: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``n`` largest entries of ``f_BM`` over the whole batch: ``(rows_S, cols_S, vals_S)``
    sorted by row, then column (ties broken arbitrarily, as a flat top-k does).

    Exact, without a top-k over all ``B * M`` entries: a threshold ``tau`` is placed from an
    evenly strided sample of ``BATCH_TOPK_SAMPLE`` entries (a top-k of the sample, with a
    margin of 25% + 4 standard deviations so that at least ``n`` entries are ``>= tau``),
    the entries ``>= tau`` are gathered (one compare, one ``nonzero``), and the top-``n`` of
    those few is the answer: every entry left out is below all of them. Should fewer than
    ``n`` pass (a badly skewed sample), the margin grows 4x and the pass repeats; a
    threshold <= 0 (fewer positive entries than about ``n``) falls back to one flat top-k.
    Measured on CPU (B=4096, M=4096, n=32 B, one thread): ~40 ms instead of ~300 ms for the
    flat top-k.
    """
    B, M = f_BM.shape
    flat_N = f_BM.reshape(-1)
    N = flat_N.numel()
    step = max(1, N // BATCH_TOPK_SAMPLE)
    while math.gcd(step, M) != 1:  # visit every column equally often
        step += 1
    sample_S = flat_N[::step]
    expected = n * sample_S.numel() / N
    rank = math.ceil(1.25 * expected + 4 * math.sqrt(expected) + 16)
    cand_C = None
    while rank < sample_S.numel():
        tau = sample_S.topk(rank, sorted=False).values.min()
        if not bool(tau > 0):
            break
        cand_C = (flat_N >= tau).nonzero().squeeze(1)
        if cand_C.numel() >= n:
            break
        cand_C, rank = None, 4 * rank
    if cand_C is None:  # fall back to the flat top-k
        cand_C = flat_N.topk(n, sorted=False).indices
    vals_C = flat_N.index_select(0, cand_C)
    flat_S = cand_C.index_select(0, vals_C.topk(n, sorted=False).indices).sort().values
    return flat_S // M, flat_S % M, flat_N.index_select(0, flat_S)


class _GatherLinear(torch.autograd.Function):
    """``pre_BM[b, idx_BL[b, l]]`` of a precomputed ``pre = x W + b``, sparse backward."""

    @staticmethod
    def forward(ctx, x_BD, W_DM, b_M, pre_BM, idx_BL, valid_BL):
        ctx.save_for_backward(x_BD, W_DM, idx_BL, valid_BL)
        return pre_BM.gather(1, idx_BL)

    @staticmethod
    def backward(ctx, g_BL):
        x_BD, W_DM, idx_BL, valid_BL = ctx.saved_tensors
        g_BL = g_BL * valid_BL  # padding entries carry no gradient
        return *_sparse_linear_grads(ctx.needs_input_grad, x_BD, W_DM, idx_BL, g_BL), None, None, None


def gather_linear(x_BD: Tensor, W_DM: Tensor, b_M: Tensor, pre_BM: Tensor, idx_BL: Tensor, valid_BL: Tensor) -> Tensor:
    """Entries ``(b, idx_BL[b, l])`` of ``pre = x_BD @ W_DM + b_M``, differentiable w.r.t.
    ``x``, ``W``, ``b`` with the sparse backward of :func:`topk_linear`.

    ``pre_BM`` is that product, computed beforehand without autograd (the caller needs it
    whole to choose the entries, e.g. BatchTopK's batch-wide top-k or a ReLU's active set);
    ``valid_BL`` (bool) marks the real entries of a padded code: padding gets no gradient.
    Cost of the backward ``O(B L D)`` instead of two ``[B, M] x`` matmuls.
    """
    return _GatherLinear.apply(x_BD, W_DM, b_M, pre_BM, idx_BL, valid_BL)


def centred_input(x_n_BD: Tensor, b_dec_D: Tensor, W_enc_DM: Tensor, b_enc_M: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_c_BD, b_eff_M)`` with ``x_c = x_n - b_dec`` (no gradient to ``b_dec``) and ``b_eff``
    equal to ``b_enc`` in value, so that ``x_c W_enc + b_eff = (x_n - b_dec) W_enc + b_enc``
    with the same gradients: ``b_dec`` gets its encoder-side gradient ``-W_enc g.sum(0)`` through
    the ``[M]`` bias (one ``[d, M]`` matrix-vector product) instead of a ``[B, M] x [M, d]``
    matmul over the whole ``[B, M]`` gradient."""
    b_dec_D_const = b_dec_D.detach()
    b_eff_M = b_enc_M + (b_dec_D_const - b_dec_D) @ W_enc_DM.detach()
    return x_n_BD - b_dec_D_const, b_eff_M


def auxk_loss(
    e_BD: Tensor,
    pre_BA: Tensor,
    idx_BA: Tensor,
    W_dec_MD: Tensor,
    coeff: float,
    scale_BA: Tensor | None = None,
    partial_BD: Tensor | None = None,
) -> Tensor:
    """Gao et al. (2024) AuxK: ``coeff * sum_b ||e_b - e_hat_b||^2 / sum_b ||e_b - mean_b(e)||^2``.

    ``e_BD``: the residual ``x_n - x_hat_n`` (detached here: AuxK must not move the main
    reconstruction). ``pre_BA`` / ``idx_BA``: pre-activations and GLOBAL indices of the
    top-``k_aux`` dead latents per token; ``e_hat = sum_j ReLU(pre_j) W_dec[idx_j]`` is decoded
    WITHOUT ``b_dec`` (the residual has no bias). ``scale_BA`` (optional) multiplies each
    ``ReLU(pre_j)`` (the MoE SAEs' expert weight, so the dead latents learn pre-activations on
    the scale of the main path). ``partial_BD`` (optional, with its gradient): a part of
    ``e_hat`` decoded elsewhere (TopK with every latent dead: the main code, which is the rest
    of the AuxK selection, from the main decode), added to the decode of ``idx_BA``. The
    denominator (the residual's total variance, clamped at 1e-12) makes the term scale-free,
    like an FVU.
    """
    e_BD = e_BD.detach()
    acts_BA = F.relu(pre_BA) if scale_BA is None else F.relu(pre_BA) * scale_BA
    e_hat_BD = sparse_decode(idx_BA, acts_BA, W_dec_MD)
    if partial_BD is not None:
        e_hat_BD = e_hat_BD + partial_BD
    denom = (e_BD - e_BD.mean(0)).pow(2).sum().clamp_min(1e-12)
    return coeff * (e_BD - e_hat_BD).pow(2).sum() / denom


def sort_by_expert(expert_B: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable-sort tokens by routed expert.

    Returns ``(order_B, inverse_B, counts_N)``: ``x[order_B]`` is grouped by expert,
    ``y_sorted[inverse_B]`` restores token order, ``counts_N`` = tokens per expert (may be 0).
    """
    order_B = torch.argsort(expert_B, stable=True)
    inverse_B = torch.empty_like(order_B)
    inverse_B[order_B] = torch.arange(order_B.numel(), device=order_B.device)
    counts_N = torch.bincount(expert_B, minlength=n_experts)
    return order_B, inverse_B, counts_N


def _aligned(t: Tensor) -> bool:
    """grouped_mm needs every non-unit stride to be a multiple of 16 bytes."""
    size = t.element_size()
    return all((s * size) % 16 == 0 for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1)


def _contiguous_grad(grad: Tensor) -> Tensor:
    # grouped_mm's backward rejects zero-stride upstream grads (e.g. from y.sum()).
    return grad.contiguous()


def grouped_mm(x_TD: Tensor, W_NDn: Tensor, counts_N: Tensor, *, force_fallback: bool = False) -> Tensor:
    """Grouped matmul: rows of ``x_TD`` (sorted by group) times their group's ``W_NDn[g]``.

    ``counts_N[g]`` rows belong to group ``g`` (groups are contiguous, zero counts allowed,
    ``counts_N.sum() == T``). Returns ``[T, n]``. Differentiable w.r.t. both operands.
    Uses the native kernel (``offs = cumsum(counts)`` as int32) when present and the strides
    are 16-byte aligned; otherwise a per-expert Python loop (old torch / odd shapes only).
    """
    device_type = x_TD.device.type
    if torch.is_autocast_enabled(device_type):  # grouped_mm is not on autocast's op list
        dtype = torch.get_autocast_dtype(device_type)
        x_TD, W_NDn = x_TD.to(dtype), W_NDn.to(dtype)
    elif W_NDn.dtype != x_TD.dtype:  # e.g. autocast produced a lower-precision input
        W_NDn = W_NDn.to(x_TD.dtype)
    x_TD = x_TD.contiguous()
    if not force_fallback and _GROUPED_MM is not None and _aligned(x_TD) and _aligned(W_NDn):
        offs_N = torch.cumsum(counts_N, 0).to(torch.int32)
        try:
            y_Tn = _GROUPED_MM(x_TD, W_NDn, offs=offs_N)
        except (RuntimeError, NotImplementedError) as err:  # e.g. no kernel for device/dtype
            _warn_fallback(f"{x_TD.device.type}/{x_TD.dtype}", err)
        else:
            if y_Tn.requires_grad:
                y_Tn.register_hook(_contiguous_grad)
            return y_Tn
    return _grouped_mm_loop(x_TD, W_NDn, counts_N)


_WARNED: set[str] = set()


def _warn_fallback(key: str, err: BaseException) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"grouped_mm unavailable for {key} ({err}); using the per-expert loop", RuntimeWarning, stacklevel=3
        )


def _grouped_mm_loop(x_TD: Tensor, W_NDn: Tensor, counts_N: Tensor) -> Tensor:
    """Reference / fallback: one matmul per expert (host sync on the counts)."""
    chunks = torch.split(x_TD, counts_N.tolist(), dim=0)
    outs = [chunk @ W_NDn[g] for g, chunk in enumerate(chunks)]
    return torch.cat(outs, dim=0)


@torch.no_grad()
def geometric_median(x_BD: Tensor, max_iter: int = 100, tol: float = 1e-6, eps: float = 1e-8) -> Tensor:
    """Geometric median of the rows of ``x_BD`` by Weiszfeld iterations (at most ``max_iter``).

    Starts at the mean; stops when the update moves less than ``tol`` (relative).
    Computed in float32 (float64 inputs stay float64), returned in the input dtype.
    """
    x = x_BD.detach()
    x = x.double() if x.dtype == torch.float64 else x.float()
    y_D = x.mean(0)
    for _ in range(max_iter):
        w_B = 1.0 / (x - y_D).norm(dim=1).clamp_min(eps)
        y_new_D = (w_B[:, None] * x).sum(0) / w_B.sum()
        step = (y_new_D - y_D).norm()
        y_D = y_new_D
        if step <= tol * max(float(y_D.norm()), 1.0):
            break
    return y_D.to(x_BD.dtype)


@torch.no_grad()
def normalise_rows_(W_MD: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale every row of ``W_MD`` to unit L2 norm, in place. Returns ``W_MD``."""
    W_MD.div_(W_MD.norm(dim=1, keepdim=True).clamp_min(eps))
    return W_MD


@torch.no_grad()
def remove_parallel_grad_(W_MD: Tensor, eps: float = 1e-8) -> None:
    """Remove from ``W_MD.grad`` the component parallel to each row of ``W_MD``, in place.

    ``g_j <- g_j - (g_j . u_j) u_j`` with ``u_j = W_j / ||W_j||``. No-op without a grad.
    """
    grad = W_MD.grad
    if grad is None:
        return
    u_MD = W_MD / W_MD.norm(dim=1, keepdim=True).clamp_min(eps)
    grad.sub_((grad * u_MD).sum(1, keepdim=True) * u_MD)


def pad_rows(rows_S: Tensor, cols_S: Tensor, vals_S: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """Scatter a row-sorted list of ``(row, col, value)`` entries into padded ``[B, L]`` tensors.

    ``rows_S`` must be ascending. Returns ``(acts_BL, idx_BL)``, ``L = max entries per row``
    (at least 1); padding has ``acts = 0`` (no gradient) and ``idx = 0``. Differentiable
    w.r.t. ``vals_S``.
    """
    rows_S, pos_S, idx_BL = _padded_positions(rows_S, cols_S, n_rows)
    acts_BL = vals_S.new_zeros(idx_BL.shape).index_put((rows_S, pos_S), vals_S)
    return acts_BL, idx_BL


def _padded_positions(rows_S: Tensor, cols_S: Tensor, n_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(rows_S, pos_S, idx_BL)``: the slot of each entry of a row-sorted list in a padded
    ``[B, L]`` code (``L`` = max entries per row, >= 1; one host sync) and the padded indices."""
    counts_B = torch.bincount(rows_S, minlength=n_rows)
    L = max(1, int(counts_B.max())) if n_rows else 1
    start_B = counts_B.cumsum(0) - counts_B
    pos_S = torch.arange(rows_S.numel(), device=rows_S.device) - start_B[rows_S]
    idx_BL = torch.zeros(n_rows, L, dtype=torch.long, device=rows_S.device)
    idx_BL[rows_S, pos_S] = cols_S
    return rows_S, pos_S, idx_BL


def padded_indices(mask_BM: Tensor) -> tuple[Tensor, Tensor]:
    """``(idx_BL, valid_BL)``: the columns of each row's True entries of ``mask_BM``
    (ascending), padded to ``L`` = max per row (>= 1) with ``idx = 0``, ``valid = False``."""
    rows_S, cols_S = mask_BM.nonzero(as_tuple=True)  # row-major: rows ascending
    return padded_entries(rows_S, cols_S, mask_BM.shape[0])


def padded_entries(rows_S: Tensor, cols_S: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """:func:`padded_indices` of a row-sorted list of ``(row, col)`` entries."""
    rows_S, pos_S, idx_BL = _padded_positions(rows_S, cols_S, n_rows)
    valid_BL = torch.zeros(idx_BL.shape, dtype=torch.bool, device=idx_BL.device)
    valid_BL[rows_S, pos_S] = True
    return idx_BL, valid_BL


def compact_code(acts_BL: Tensor, idx_BL: Tensor) -> tuple[Tensor, Tensor]:
    """The padded code of the entries with ``acts > 0`` only (drops inactive entries that a
    code carried for its gradients); differentiable w.r.t. ``acts_BL``."""
    rows_S, pos_S = (acts_BL.detach() > 0).nonzero(as_tuple=True)
    return pad_rows(rows_S, idx_BL[rows_S, pos_S], acts_BL[rows_S, pos_S], acts_BL.shape[0])


# Variable-L0 codes (ReLU, JumpReLU, Gated): L = the most active latents of any token.
# Training: a code at least DENSE_TRAIN_MIN_FILL of M wide is computed by the fused dense
# kernels of saepipe/saes/dense_code.py (encoder, activation, decoder and their backward over
# [B, M]); a narrower one takes the sparse path (padded code, embedding_bag decode, sparse
# encoder backward by gather_linear), whose cost grows with L. Measured on CPU (d=128,
# M=B=4096, one thread, ReLU step): equal at L ~ M/10 (~290 ms each); at L = M/18 sparse
# 204 ms vs dense 332 ms, at L = M/5 dense 419 ms vs sparse 523 ms, at L = M/2 (random
# inputs at init) dense 380 ms vs sparse 3180 ms. Same crossover for JumpReLU and Gated.
DENSE_TRAIN_MIN_FILL = 1 / 10
# Evaluation (no autograd): a code at least DENSE_DECODE_MIN_FILL of M wide is decoded by one
# [B, M] @ [M, d] matmul instead of embedding_bag (calibrated on a ReLU SAE on CPU, d=128,
# M=B=1024: a padded code of L = 561 took 281 ms sparse).
DENSE_DECODE_MIN_FILL = 1 / 32


def code_is_wide(mask_BM: Tensor, sample_rows: int = 256) -> bool:
    """Whether the code of ``mask_BM`` (True = active) is at least ``DENSE_TRAIN_MIN_FILL`` of
    M wide, judged on its first ``sample_rows`` rows (one small host sync). Only speed
    depends on the answer: both paths compute the same values and gradients."""
    rows = mask_BM[:sample_rows]
    width = int(rows.sum(1).max()) if rows.numel() else 0
    return width >= mask_BM.shape[1] * DENSE_TRAIN_MIN_FILL


def decode(idx_BK: Tensor, acts_BK: Tensor, W_dec_MD: Tensor, dense_BM: Tensor | None = None) -> Tensor:
    """``sum_j acts_j W_dec[idx_j]``: a matmul when a dense code is given, else sparse."""
    if dense_BM is not None:
        return dense_BM @ W_dec_MD
    return sparse_decode(idx_BK, acts_BK, W_dec_MD)


def padded_code(values_BM: Tensor, mask_BM: Tensor) -> tuple[Tensor, Tensor]:
    """Padded sparse code of ``values_BM`` restricted to ``mask_BM`` (see :func:`pad_rows`).

    The active set is given by ``mask_BM`` (entries outside it are treated as 0); gradients
    flow to ``values_BM`` at the masked entries only.
    """
    rows_S, cols_S = mask_BM.nonzero(as_tuple=True)  # row-major: rows ascending
    return pad_rows(rows_S, cols_S, values_BM[rows_S, cols_S], values_BM.shape[0])
