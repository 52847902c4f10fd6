"""Shared compute kernels for the SAE architectures (pure torch).

- :func:`sparse_decode` - one ``F.embedding_bag`` over GLOBAL latent indices; never builds a
  dense ``[B, M]`` code (docs/reference.md §4).
- :func:`topk_linear` - dense encoder ``x W + b`` followed by TopK (optionally a second TopK
  over a masked subset, for AuxK) whose backward is sparse: only the selected ``B x k`` entries
  reach ``W`` / ``b`` (embedding_bag weight-gradient kernel), never a dense ``[B, M]`` grad.
- :func:`grouped_mm` - one grouped matmul of token rows sorted by expert against per-expert
  weights (``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``), with a per-expert loop
  fallback for old torch or shapes the kernel cannot take (strides not 16-byte aligned).
- :func:`pad_rows` / :func:`padded_code` - padded ``(acts_BL, idx_BL)`` code for variable-L0
  architectures (L = max active latents of any row; padding acts 0, idx 0).
- :func:`auxk_loss` - Gao et al.'s normalised AuxK term from the selected dead latents (every
  TopK-family SAE: TopK, BatchTopK, Switch, Scale).
- :func:`geometric_median` - Weiszfeld iterations (<= 100) for the data-dependent bias init.
- :func:`normalise_rows_` / :func:`remove_parallel_grad_` - unit-norm decoder-row helpers.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "sparse_decode",
    "pad_rows",
    "padded_code",
    "variable_code",
    "decode",
    "topk_linear",
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


def sparse_decode(idx_BK: Tensor, acts_BK: Tensor, W_dec_MD: Tensor) -> Tensor:
    """Return ``sum_j acts_BK[b, j] * W_dec_MD[idx_BK[b, j]]`` as ``[B, D]`` (no decoder bias).

    One ``F.embedding_bag(mode="sum", per_sample_weights=...)`` call; cost ``2 * D * K`` per token.
    """
    return F.embedding_bag(idx_BK, W_dec_MD, per_sample_weights=acts_BK.to(W_dec_MD.dtype), mode="sum")


def _bag_weight_grad(idx_BK: Tensor, w_BK: Tensor, grad_BD: Tensor, n_rows: int) -> Tensor:
    """``G[m] = sum_{(b, j): idx[b, j] = m} w[b, j] * grad[b]`` as ``[n_rows, D]``.

    The weight gradient of ``embedding_bag``; computed with its optimised backward kernel.
    """
    with torch.enable_grad():
        table_MD = torch.zeros(n_rows, grad_BD.shape[1], dtype=grad_BD.dtype, device=grad_BD.device, requires_grad=True)
        y_BD = F.embedding_bag(idx_BK, table_MD, per_sample_weights=w_BK, mode="sum")
        (g_MD,) = torch.autograd.grad(y_BD, table_MD, grad_BD)
    return g_MD


class _TopKLinear(torch.autograd.Function):
    """``pre = x W + b``; ``(vals, idx) = topk(pre, k)`` [+ topk over ``pre`` masked to
    ``aux_mask``]; the backward scatters only the selected entries' gradients."""

    @staticmethod
    def forward(ctx, x_BD, W_DM, b_M, k, aux_mask_M, k_aux):
        pre_BM = torch.addmm(b_M, x_BD, W_DM)
        vals_BK, idx_BK = pre_BM.topk(k, dim=1, sorted=False)
        if aux_mask_M is not None and k_aux > 0:
            pre_BM.masked_fill_(~aux_mask_M, float("-inf"))  # own buffer: reuse its memory
            vals_aux_BA, idx_aux_BA = pre_BM.topk(k_aux, dim=1, sorted=False)
        else:
            vals_aux_BA, idx_aux_BA = vals_BK[:, :0], idx_BK[:, :0]
        ctx.save_for_backward(x_BD, W_DM, idx_BK, idx_aux_BA)
        ctx.mark_non_differentiable(idx_BK, idx_aux_BA)
        return vals_BK, idx_BK, vals_aux_BA.clone(), idx_aux_BA.clone()

    @staticmethod
    def backward(ctx, g_vals_BK, _g_idx, g_aux_BA, _g_idx_aux):
        x_BD, W_DM, idx_BK, idx_aux_BA = ctx.saved_tensors
        idx_BJ = torch.cat([idx_BK, idx_aux_BA], dim=1)
        g_BJ = torch.cat([g_vals_BK, g_aux_BA], dim=1).to(W_DM.dtype)
        M = W_DM.shape[1]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = sparse_decode(idx_BJ, g_BJ, W_DM.t().contiguous()).to(x_BD.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = _bag_weight_grad(idx_BJ, g_BJ, x_BD.to(W_DM.dtype), M).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(M, dtype=W_DM.dtype, device=W_DM.device)
            grad_b.index_add_(0, idx_BJ.reshape(-1), g_BJ.reshape(-1))
        return grad_x, grad_W, grad_b, None, None, None


def topk_linear(
    x_BD: Tensor,
    W_DM: Tensor,
    b_M: Tensor,
    k: int,
    aux_mask_M: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TopK of the pre-activations ``x_BD @ W_DM + b_M`` with a sparse backward.

    Returns ``(vals_BK, idx_BK, vals_aux_BA, idx_aux_BA)``: the top-``k`` values/indices and,
    when ``aux_mask_M`` (bool ``[M]``) and ``k_aux > 0`` are given, the top-``k_aux`` among the
    masked latents (``k_aux`` must not exceed the mask's count); else empty ``[B, 0]``.
    Values are raw pre-activations (apply ReLU outside). Gradients w.r.t. ``x``, ``W``, ``b``
    equal those of the dense formulation but cost ``O(B (k + k_aux) D)``.
    """
    return _TopKLinear.apply(x_BD, W_DM, b_M, k, aux_mask_M, k_aux)


def auxk_loss(
    e_BD: Tensor,
    pre_BA: Tensor,
    idx_BA: Tensor,
    W_dec_MD: Tensor,
    coeff: float,
    scale_BA: Tensor | None = None,
) -> Tensor:
    """Gao et al. (2024) AuxK: ``coeff * sum_b ||e_b - e_hat_b||^2 / sum_b ||e_b - mean_b(e)||^2``.

    ``e_BD``: the residual ``x_n - x_hat_n`` (detached here: AuxK must not move the main
    reconstruction). ``pre_BA`` / ``idx_BA``: pre-activations and GLOBAL indices of the
    top-``k_aux`` dead latents per token; ``e_hat = sum_j ReLU(pre_j) W_dec[idx_j]`` is decoded
    WITHOUT ``b_dec`` (the residual has no bias). ``scale_BA`` (optional) multiplies each
    ``ReLU(pre_j)`` (the MoE SAEs' expert weight, so the dead latents learn pre-activations on
    the scale of the main path). The denominator (the residual's total variance, clamped at
    1e-12) makes the term scale-free, like an FVU.
    """
    e_BD = e_BD.detach()
    acts_BA = F.relu(pre_BA) if scale_BA is None else F.relu(pre_BA) * scale_BA
    e_hat_BD = sparse_decode(idx_BA, acts_BA, W_dec_MD)
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
    counts_B = torch.bincount(rows_S, minlength=n_rows)
    L = max(1, int(counts_B.max())) if n_rows else 1  # one host sync
    start_B = counts_B.cumsum(0) - counts_B
    pos_S = torch.arange(rows_S.numel(), device=rows_S.device) - start_B[rows_S]
    idx_BL = torch.zeros(n_rows, L, dtype=torch.long, device=rows_S.device)
    idx_BL[rows_S, pos_S] = cols_S
    acts_BL = vals_S.new_zeros(n_rows, L).index_put((rows_S, pos_S), vals_S)
    return acts_BL, idx_BL


# A padded code at least this fraction of M wide is decoded as a dense [B, M] @ [M, d]
# matmul: embedding_bag (and its backward) only wins while the code is narrow. Measured on
# CPU (d=128, M=1024, B=1024): a ReLU SAE step with L = 561 takes 281 ms sparse.
DENSE_DECODE_MIN_FILL = 1 / 32


def variable_code(values_BM: Tensor, mask_BM: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`padded_code` plus, when the code is wide (L >= M * DENSE_DECODE_MIN_FILL), the
    dense masked code ``values * mask`` for :func:`decode`; else None. Same gradients."""
    acts_BL, idx_BL = padded_code(values_BM, mask_BM)
    wide = acts_BL.shape[1] >= values_BM.shape[1] * DENSE_DECODE_MIN_FILL
    return acts_BL, idx_BL, (values_BM * mask_BM) if wide else None


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
