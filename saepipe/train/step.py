"""One optimizer step of the SAE protocol (saepipe/saes/base.py) and the optimizer it uses."""

from __future__ import annotations

import torch

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def make_optimizer(sae: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """Adam over the SAE's parameters with the fused kernel (one pass over all of them) on
    CUDA and on the CPU, where it is 3.8x faster than the default per-tensor loop (1.5 vs
    5.7 ms for the 2.1M parameters of a d=128, M=8192 Switch SAE, one thread)."""
    fused = next(sae.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.Adam(sae.parameters(), lr=lr, fused=fused or None)


def train_step(
    sae, opt: torch.optim.Optimizer, x_BD: torch.Tensor, autocast: torch.dtype | None, grad_clip: float | None = None
):
    """One optimizer step of the protocol in saepipe/saes/base.py; returns (SAEOutput, loss).

    With `autocast` (e.g. torch.bfloat16) the forward runs under torch.autocast: matmuls in
    that dtype, parameters, gradients, Adam state and the losses in float32. `grad_clip`:
    the global gradient norm is clipped to it after the SAE's gradient hook (e.g. removing
    the decoder-parallel component) and before the step.
    """
    with torch.autocast(x_BD.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = sae(x_BD)
        loss = sum(out.losses.values())
    loss.backward()
    sae.before_optimizer_step()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip, foreach=True)
    opt.step()
    sae.after_optimizer_step()
    opt.zero_grad(set_to_none=True)
    return out, loss
