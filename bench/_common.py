"""Shared by the benchmarks: straightforward reference SAEs (never used by the library) and
the training-step timer.

- `DenseTopK`: dense encoder, dense [B, M] code, dense decode (what one writes first).
- `ReferenceSwitch`: the papers' reference-code style: every expert's encoder computed
  densely, then masked to the routed expert.

Both follow the trainer's protocol (`out.losses`, `before_optimizer_step`,
`after_optimizer_step`) with the same unit-norm decoder maintenance as the library, so a
benchmark step does the same work for them as for the library SAEs.
- `time_steps`: median seconds of the trainer's own step (saepipe.train.train_step: forward
  under autocast, backward, decoder hooks, Adam, fused on CUDA).
- `time_interleaved`: the same step for several models side by side, round-robin, so that a
  change of the machine's load (a shared CPU) hits every model alike.
- `paired_ratio`: the per-round ratio of two interleaved rows, its median and a
  distribution-free 95% interval (`median_ci`), so a target is judged against the noise.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from saepipe.saes import kernels
from saepipe.train import make_optimizer, train_step


class Out(NamedTuple):
    losses: dict[str, torch.Tensor]


class _UnitNormDecoder(nn.Module):
    """Unit-norm decoder rows: the gradient's parallel part removed, rows renormalised."""

    def before_optimizer_step(self) -> None:
        kernels.remove_parallel_grad_(self.W_dec)

    def after_optimizer_step(self) -> None:
        kernels.normalise_rows_(self.W_dec.data)


class DenseTopK(_UnitNormDecoder):
    """Straightforward TopK SAE: dense encoder, dense [B, M] code, dense decode."""

    def __init__(self, d: int, M: int, k: int):
        super().__init__()
        self.k = k
        self.W_enc = nn.Parameter(torch.randn(d, M) / d**0.5)
        self.b_enc = nn.Parameter(torch.zeros(M))
        self.W_dec = nn.Parameter(self.W_enc.detach().t().clone())
        self.b_dec = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> Out:
        pre = F.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        vals, idx = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, vals)
        x_hat = z @ self.W_dec + self.b_dec
        return Out({"mse": (x - x_hat).float().pow(2).mean()})


class ReferenceSwitch(_UnitNormDecoder):
    """Switch SAE as the papers' reference code computes it: all M latents, then a mask."""

    def __init__(self, d: int, M: int, k: int, N: int):
        super().__init__()
        self.k, self.N, self.n = k, N, M // N
        self.W_enc = nn.Parameter(torch.randn(d, M) / d**0.5)
        self.W_dec = nn.Parameter(self.W_enc.detach().t().clone())
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.W_router = nn.Parameter(torch.randn(d, N) / d**0.5)
        self.b_router = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> Out:
        p = torch.softmax((x - self.b_router) @ self.W_router, -1)
        expert = p.argmax(-1)
        pre = F.relu((x - self.b_dec) @ self.W_enc)  # every expert, dense
        owner = torch.arange(pre.shape[1], device=x.device) // self.n
        pre = pre * (owner[None, :] == expert[:, None])  # keep the routed one
        vals, idx = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, vals)
        gate = p.gather(-1, expert[:, None])
        x_hat = gate * (z @ self.W_dec) + self.b_dec
        f = F.one_hot(expert, self.N).float().mean(0)
        return Out({"mse": (x - x_hat).float().pow(2).mean(), "balance": self.N * (f * p.mean(0)).sum()})


def time_steps(model: nn.Module, x: torch.Tensor, steps: int, warmup: int, autocast: torch.dtype | None) -> float:
    """Median wall seconds of one full training step (incl. optimizer) over `steps` after `warmup`."""
    opt = make_optimizer(model, 1e-4)
    times = []
    for i in range(warmup + steps):
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        train_step(model, opt, x, autocast)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(
    models: dict[str, nn.Module],
    x: torch.Tensor,
    steps: int,
    warmup: int,
    autocast: torch.dtype | None,
    before_step: dict[str, Callable[[], None]] | None = None,
) -> dict[str, list[float]]:
    """Wall seconds of one full training step (as `time_steps`) of every model, ``steps`` rounds
    after ``warmup``: each round steps every model once, the order rotated by one per round.
    ``before_step[name]`` (untimed) runs before each of that model's steps. Returns the
    per-step times of each model (take the median)."""
    opts = {name: make_optimizer(model, 1e-4) for name, model in models.items()}
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            if before_step and name in before_step:
                before_step[name]()
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            t0 = time.perf_counter()
            train_step(models[name], opts[name], x, autocast)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(median, lo, hi)``: the sample median and a distribution-free ``level`` confidence
    interval for the population median from the order statistics (the sign-test interval:
    ``[x_(j), x_(n+1-j)]`` with the largest j such that P(Binomial(n, 1/2) < j) <= (1 - level)
    / 2). Needs n >= 6 at 95% (fewer values: the interval is their whole range)."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_ci needs at least one value")
    tail, j, below = (1 - level) / 2, 0, 0.0
    while j < n // 2 and below + math.comb(n, j) / 2**n <= tail:
        below += math.comb(n, j) / 2**n  # P(Bin < j + 1)
        j += 1
    lo, hi = (xs[j - 1], xs[n - j]) if j else (xs[0], xs[-1])
    return statistics.median(xs), lo, hi


def paired_ratio(times_a: list[float], times_b: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """``median_ci`` of ``a_i / b_i`` over the rounds of `time_interleaved` (round i stepped both
    rows within one rotation, so each ratio sees one moment's machine load)."""
    if len(times_a) != len(times_b):
        raise ValueError(f"paired_ratio needs rows of equal rounds, got {len(times_a)} and {len(times_b)}")
    return median_ci([a / b for a, b in zip(times_a, times_b, strict=True)], level)


def topk_arch() -> str:
    """Registry name of the TopK baseline the speed-ups are relative to, by its traits: dense,
    k fixes L0, no learned threshold; the first such architecture in ``ORDER``."""
    from saepipe.saes import ARCHITECTURES, arch_traits

    plain = [
        a
        for a in ARCHITECTURES
        if not arch_traits(a)["routed"] and arch_traits(a)["l0_fixed"] and not arch_traits(a)["has_threshold"]
    ]
    return min(plain, key=lambda a: arch_traits(a)["arch_order"])


def routing_fields(arch: str) -> tuple[bool, bool]:
    """(routed, its experts per token is a config field ``active_experts``) of an architecture."""
    from saepipe.saes import ARCHITECTURES, arch_traits

    return arch_traits(arch)["routed"], "active_experts" in ARCHITECTURES[arch][1].field_names()
