"""Fused dense-code kernels: the training step of the variable-L0 SAEs (ReLU, JumpReLU, Gated)
when their code is wide (:func:`kernels.code_is_wide`).

Early in training and on unstructured inputs about half of the M latents fire, so a padded
sparse code is as wide as the dense one and far slower; these kernels compute encoder,
activation and decoder as ONE autograd node over dense ``[B, M]`` tensors, with a backward
written out by hand. What makes them fast (CPU, the preset of ``bench/arch_speed.py``):

- no ``[B, d] x [d, M]`` matmul for the ``b_dec`` gradient of the encoder input: ``b_dec``
  gets ``-W_enc (sum_b g_pre)`` (a matrix-vector product; the input's own gradient is only
  computed when the input requires one);
- few fresh ``[B, M]`` buffers (on CPU a new 64 MB tensor costs page faults, about 6x an
  in-place pass over it): the pre-activation buffer becomes the code in place, masks are
  applied with ``threshold_backward`` writing into its own input (one vectorised pass; a
  bool-mask multiply, ``where`` or ``masked_fill`` is ~10x slower on CPU), and the
  regularisers' sums are taken from tensors already there;
- the loss terms that depend on the whole code (L1 sums, the L0 count) are returned as small
  outputs (``[M]`` sums, a count), so autograd never sees a ``[B, M]`` intermediate.

Gradients are those of the naive dense formulas (tests/test_fast_paths.py checks every
parameter against them). Under autocast the matmuls and the ``[B, M]`` buffers use the
autocast dtype; the ``[M]`` sums are float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import SCRATCH

__all__ = ["relu_dense", "jumprelu_dense", "gated_dense"]

_threshold_ = torch.ops.aten.threshold_backward.grad_input  # out = g where t > thr else 0
_BLOCK = 1 << 21  # elements per row block of the blockwise reductions (8 MB in float32)


def _keep_where_positive_(g_BM: Tensor, t_BM: Tensor, out_BM: Tensor | None = None) -> Tensor:
    """``out = g * (t > 0)`` (exactly: ``g`` where ``t > 0``, else 0), written into ``out``
    (default ``g``, in place): relu's backward kernel, one vectorised pass."""
    out_BM = g_BM if out_BM is None else out_BM
    return _threshold_(g_BM, t_BM, 0, grad_input=out_BM)


def _count_positive(t_BM: Tensor, dim: int | None = None) -> Tensor:
    """Number of entries ``> 0`` (over ``dim``, or all), float32. Counted through ``sign`` in
    row blocks on CPU, where a bool sum is ~10x slower than a float one."""
    if t_BM.device.type != "cpu":
        pos = t_BM > 0
        return (pos.sum() if dim is None else pos.sum(dim)).to(torch.float32)
    rows = max(1, _BLOCK // max(1, t_BM.shape[1]))
    total = torch.zeros((), dtype=torch.float64) if dim is None else torch.zeros(t_BM.shape[1], dtype=torch.float64)
    for i in range(0, t_BM.shape[0], rows):
        block = torch.sign(t_BM[i : i + rows]).clamp_min_(0)
        total += block.sum(dtype=torch.float64) if dim is None else block.sum(0, dtype=torch.float64)
    return total.to(torch.float32)


def _amp(t: Tensor) -> torch.dtype:
    """The dtype the kernel computes in: autocast's when enabled for ``t``'s device, else ``t``'s."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def _encoder_grads(ctx, g_pre_BM: Tensor, x_c_BD: Tensor, W_enc_DM: Tensor) -> tuple:
    """``(grad_x, grad_b_dec, grad_W_enc, grad_b_enc)`` of ``pre = (x - b_dec) W_enc + b_enc``
    from ``g_pre``; ``grad_b_dec = -W_enc g_pre.sum(0)`` (no ``[B, M] x [M, d]`` matmul
    unless the input itself needs a gradient)."""
    needs = ctx.needs_input_grad
    g_b_M = g_pre_BM.sum(0, dtype=torch.float32)
    grad_x = g_pre_BM @ W_enc_DM.t() if needs[0] else None
    grad_b_dec = -(W_enc_DM.float() @ g_b_M) if needs[1] else None
    grad_W = x_c_BD.t() @ g_pre_BM if needs[2] else None
    return grad_x, grad_b_dec, grad_W, g_b_M if needs[3] else None


class _ReLUDense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD, b_dec_D, W_enc_DM, b_enc_M, W_dec_MD):
        dt = _amp(x_BD)
        with torch.autocast(x_BD.device.type, enabled=False):
            x_c_BD = (x_BD - b_dec_D).to(dt)
            W_enc, W_dec = W_enc_DM.to(dt), W_dec_MD.to(dt)
            f_BM = torch.addmm(b_enc_M.to(dt), x_c_BD, W_enc).relu_()
            x_hat_BD = f_BM @ W_dec
            f_sum_M = f_BM.sum(0, dtype=torch.float32)
        ctx.save_for_backward(x_c_BD, W_enc, W_dec, f_BM)
        ctx.set_materialize_grads(False)
        return x_hat_BD, f_BM, f_sum_M

    @staticmethod
    def backward(ctx, g_x_hat_BD, g_f_BM, g_f_sum_M):
        x_c_BD, W_enc, W_dec, f_BM = ctx.saved_tensors
        dt = f_BM.dtype
        g_f = _code_grad(g_x_hat_BD, g_f_BM, g_f_sum_M, W_dec, f_BM)
        grad_W_dec = f_BM.t() @ g_x_hat_BD.to(dt) if ctx.needs_input_grad[4] and g_x_hat_BD is not None else None
        g_pre = _keep_where_positive_(g_f, f_BM)  # ReLU: f > 0 <=> pre > 0
        grads = _encoder_grads(ctx, g_pre, x_c_BD, W_enc)
        SCRATCH.give(g_pre)
        return *grads, grad_W_dec


def _code_grad(
    g_x_hat_BD: Tensor | None, g_f_BM: Tensor | None, g_sum_M: Tensor | None, W_dec_MD: Tensor, like_BM: Tensor
) -> Tensor:
    """``dL/df = g_x_hat W_dec^T + g_sum (broadcast over rows) + g_f`` in one ``[B, M]``
    buffer taken from :data:`kernels.SCRATCH` (the caller gives it back)."""
    dt = like_BM.dtype
    g_BM = SCRATCH.take(tuple(like_BM.shape), dt, like_BM.device)
    if g_x_hat_BD is None:
        g_BM.zero_()
    else:
        torch.mm(g_x_hat_BD.to(dt), W_dec_MD.t(), out=g_BM)
    if g_sum_M is not None:
        g_BM += g_sum_M.to(dt)
    if g_f_BM is not None:
        g_BM += g_f_BM
    return g_BM


def relu_dense(
    x_BD: Tensor, b_dec_D: Tensor, W_enc_DM: Tensor, b_enc_M: Tensor, W_dec_MD: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """ReLU SAE step, fused: ``f = ReLU((x - b_dec) W_enc + b_enc)``; returns
    ``(f W_dec, f, f.sum(0))`` (no ``b_dec`` in the reconstruction).

    5 ``[B, d] x [d, M]``-sized matmuls (encoder, decoder, and their weight and code
    gradients) and 2 fresh ``[B, M]`` buffers per step, against 6 matmuls and ~6 buffers for
    autograd over the same formula. Measured in the CPU preset of ``bench/arch_speed.py``:
    see the ReLU row of ``bench/results/arch_speed-*.json``.
    """
    return _ReLUDense.apply(x_BD, b_dec_D, W_enc_DM, b_enc_M, W_dec_MD)


class _JumpReLUDense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD, b_dec_D, W_enc_DM, b_enc_M, theta_M, W_dec_MD, eps):
        dt = _amp(x_BD)
        with torch.autocast(x_BD.device.type, enabled=False):
            x_c_BD = (x_BD - b_dec_D).to(dt)
            W_enc, W_dec, theta = W_enc_DM.to(dt), W_dec_MD.to(dt), theta_M.to(dt)
            f_BM = torch.addmm(b_enc_M.to(dt), x_c_BD, W_enc).relu_()  # r, becomes f below
            u_BM = f_BM - theta  # r - theta, becomes the window margin below
            count = _count_positive(u_BM)  # L0 count: r > theta
            _keep_where_positive_(f_BM, u_BM)  # f = r * H(r - theta)
            u_BM.abs_().neg_().add_(eps / 2)  # u = eps/2 - |r - theta| > 0 <=> in the STE window
            x_hat_BD = f_BM @ W_dec
        ctx.save_for_backward(x_c_BD, W_enc, W_dec, theta, f_BM, u_BM)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        return x_hat_BD, f_BM, count

    @staticmethod
    def backward(ctx, g_x_hat_BD, g_f_BM, g_count):
        x_c_BD, W_enc, W_dec, theta, f_BM, u_BM = ctx.saved_tensors
        dt, eps = f_BM.dtype, ctx.eps
        g_f = _code_grad(g_x_hat_BD, g_f_BM, None, W_dec, f_BM)
        grad_theta = None
        if ctx.needs_input_grad[4]:
            # STE (rectangle kernel K = 1[|r - theta| < eps/2]): d f/d theta = -(theta/eps) K,
            # d count/d theta = -(1/eps) K
            grad_theta = torch.zeros(theta.shape, dtype=torch.float32, device=theta.device)
            if g_count is not None:
                grad_theta -= (g_count.float() / eps) * _count_positive(u_BM, dim=0)
            g_in_window_M = _keep_where_positive_(g_f, u_BM, out_BM=u_BM).sum(0, dtype=torch.float32)
            grad_theta -= (theta.float() / eps) * g_in_window_M
        grad_W_dec = f_BM.t() @ g_x_hat_BD.to(dt) if ctx.needs_input_grad[5] and g_x_hat_BD is not None else None
        g_pre = _keep_where_positive_(g_f, f_BM)  # f > 0 <=> pre > 0 and r > theta
        grads = _encoder_grads(ctx, g_pre, x_c_BD, W_enc)
        SCRATCH.give(g_pre)
        return *grads, grad_theta, grad_W_dec, None


def jumprelu_dense(
    x_BD: Tensor, b_dec_D: Tensor, W_enc_DM: Tensor, b_enc_M: Tensor, theta_M: Tensor, W_dec_MD: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """JumpReLU SAE step, fused: ``r = ReLU((x - b_dec) W_enc + b_enc)``,
    ``f = r H(r - theta)``; returns ``(f W_dec, f, count)`` with ``count = sum H(r - theta)``
    (the L0 count, float32).

    The straight-through estimator of :mod:`saepipe.saes.jumprelu` (rectangle kernel of width
    ``eps``): ``theta`` gets ``-(theta/eps) sum_b K dL/df - (dL/dcount / eps) sum_b K``; ``r``
    gets ``H dL/df``. The window ``K`` is kept as the margin ``eps/2 - |r - theta|`` in the
    pre-activation's second buffer. 5 matmuls and 3 fresh ``[B, M]`` buffers per step (autograd
    over the STE: 6 matmuls, ~8 buffers). Measured: the JumpReLU row of
    ``bench/results/arch_speed-*.json``.
    """
    return _JumpReLUDense.apply(x_BD, b_dec_D, W_enc_DM, b_enc_M, theta_M, W_dec_MD, eps)


class _GatedDense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD, b_dec_D, W_DM, b_gate_M, r_mag_M, b_mag_M, W_dec_MD):
        dt = _amp(x_BD)
        with torch.autocast(x_BD.device.type, enabled=False):
            x_c_BD = (x_BD - b_dec_D).to(dt)
            W, W_dec = W_DM.to(dt), W_dec_MD.to(dt)
            scale_M = r_mag_M.exp().to(dt)
            gate_BM = x_c_BD @ W  # p, becomes pi_gate, then ReLU(pi_gate)
            f_BM = torch.addcmul(b_mag_M.to(dt), gate_BM, scale_M).relu_()  # ReLU(mag)
            gate_BM += b_gate_M.to(dt)
            _keep_where_positive_(f_BM, gate_BM)  # f = 1[pi_gate > 0] ReLU(mag)
            gate_BM.relu_()
            x_hat_BD = f_BM @ W_dec
            x_aux_BD = gate_BM @ W_dec
            gate_sum_M = gate_BM.sum(0, dtype=torch.float32)
        ctx.save_for_backward(x_c_BD, W, W_dec, scale_M, b_mag_M, f_BM, gate_BM)
        ctx.set_materialize_grads(False)
        return x_hat_BD, x_aux_BD, f_BM, gate_sum_M

    @staticmethod
    def backward(ctx, g_x_hat_BD, g_x_aux_BD, g_f_BM, g_gate_sum_M):
        x_c_BD, W, W_dec, scale_M, b_mag_M, f_BM, gate_BM = ctx.saved_tensors
        dt, needs = f_BM.dtype, ctx.needs_input_grad
        g_mag = _keep_where_positive_(_code_grad(g_x_hat_BD, g_f_BM, None, W_dec, f_BM), f_BM)
        grad_W_dec = f_BM.t() @ g_x_hat_BD.to(dt) if needs[6] and g_x_hat_BD is not None else None
        # gate path: the auxiliary reconstruction (W_dec held fixed) and the L1 sum
        g_pi = _keep_where_positive_(_code_grad(g_x_aux_BD, None, g_gate_sum_M, W_dec, gate_BM), gate_BM)
        g_b_gate = g_pi.sum(0, dtype=torch.float32)
        g_b_mag = g_mag.sum(0, dtype=torch.float32)
        g_p = g_pi.addcmul_(g_mag, scale_M)  # dL/dp = g_pi + exp(r_mag) g_mag
        # d mag / d r_mag = exp(r_mag) p = mag - b_mag = f - b_mag where g_mag != 0
        g_r_mag = g_mag.mul_(f_BM).sum(0, dtype=torch.float32) - b_mag_M.float() * g_b_mag if needs[4] else None
        grad_x, grad_b_dec, grad_W, _ = _encoder_grads(ctx, g_p, x_c_BD, W)
        SCRATCH.give(g_p)
        SCRATCH.give(g_mag)
        return grad_x, grad_b_dec, grad_W, g_b_gate, g_r_mag, g_b_mag, grad_W_dec


def gated_dense(
    x_BD: Tensor, b_dec_D: Tensor, W_DM: Tensor, b_gate_M: Tensor, r_mag_M: Tensor, b_mag_M: Tensor, W_dec_MD: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gated SAE step, fused: ``p = (x - b_dec) W``, ``pi = p + b_gate``,
    ``f = 1[pi > 0] ReLU(exp(r_mag) p + b_mag)``; returns ``(f W_dec, ReLU(pi) sg(W_dec), f,
    ReLU(pi).sum(0))``: the reconstruction and the auxiliary gate reconstruction (both without
    ``b_dec``; ``W_dec`` gets no gradient from the second), the code, the L1 sums.

    One encoder matmul serves both paths; the ``r_mag`` gradient uses ``exp(r_mag) p = f -
    b_mag`` on the support of ``f``, so ``p`` is not kept. 7 matmuls and 4 fresh ``[B, M]``
    buffers per step (autograd over the formula: 8 matmuls, ~12 buffers). Measured: the Gated
    row of ``bench/results/arch_speed-*.json``.
    """
    return _GatedDense.apply(x_BD, b_dec_D, W_DM, b_gate_M, r_mag_M, b_mag_M, W_dec_MD)
