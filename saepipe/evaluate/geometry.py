"""Dictionary geometry and routing metrics (docs/reference.md §3): redundancy, expert specialization,
expert similarity, activation similarity and expert usage.

All functions take torch tensors on any device (CPU included) and compute in float32 on
that device; scalar results are plain Python floats, ready for JSON. Tensors returned for
histograms (``max_cos_M``, pairwise cosine samples, similarity matrices) live on the CPU.

Conventions
-----------
* Feature directions are the rows of ``W_dec [M, d]``, L2-normalised here (Scale's
  ``decoder_norm="columns"`` leaves rows un-normalised; an all-zero row stays zero and has
  cosine 0 with everything).
* Cosines are SIGNED: an anti-parallel pair (cos = -1) is not redundant, since with
  non-negative activations the two features cannot stand in for each other. Thresholds are
  strict (``cos > threshold``).
* Experts own contiguous latent blocks: expert ``i`` owns ``[i * n, (i + 1) * n)`` with
  ``n = M // N`` (Switch and Scale, docs/reference.md §1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "decoder_redundancy",
    "expert_specialization",
    "expert_similarity_matrix",
    "within_between_cosines",
    "activation_similarity",
    "ExpertUsage",
    "unit_rows",
    "max_other_cos",
]


def unit_rows(W_MD: Tensor) -> Tensor:
    """Rows L2-normalised in float32 (zero rows stay zero)."""
    if W_MD.dim() != 2:
        raise ValueError(f"expected a 2-D decoder [M, d], got shape {tuple(W_MD.shape)}")
    return F.normalize(W_MD.detach().float(), dim=1, eps=1e-12)


def _expert_width(M: int, n_experts: int) -> int:
    if not isinstance(n_experts, int) or n_experts <= 0:
        raise ValueError(f"n_experts must be a positive int, got {n_experts!r}")
    if M % n_experts:
        raise ValueError(f"M={M} decoder rows are not divisible by n_experts={n_experts}")
    return M // n_experts


@torch.no_grad()
def max_other_cos(U_MD: Tensor, chunk: int) -> Tensor:
    """For each unit row, its max cosine to any OTHER row: ``[M]`` float32, U's device.

    Tiles the ``M x M`` Gram matrix in ``chunk x chunk`` blocks and visits only the blocks
    on or above the diagonal (each off-diagonal block updates both its rows' and its
    columns' maxima), so peak extra memory is ``chunk**2`` floats and the cost is about
    ``M**2 d / 2`` multiply-adds. Row and column tiles share boundaries, so self-pairs only
    occur on the diagonal of the diagonal blocks, which are masked out.
    """
    M = U_MD.shape[0]
    if M < 2:
        raise ValueError(f"need at least 2 features to compare, got M={M}")
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    best_M = torch.full((M,), -math.inf, dtype=torch.float32, device=U_MD.device)
    for r0 in range(0, M, chunk):
        r1 = min(r0 + chunk, M)
        rows = U_MD[r0:r1]
        for c0 in range(r0, M, chunk):
            c1 = min(c0 + chunk, M)
            sims = rows @ U_MD[c0:c1].T
            if c0 == r0:
                sims.fill_diagonal_(-math.inf)
            best_M[r0:r1] = torch.maximum(best_M[r0:r1], sims.max(dim=1).values)
            if c0 != r0:
                best_M[c0:c1] = torch.maximum(best_M[c0:c1], sims.max(dim=0).values)
    return best_M


def decoder_redundancy(
    W_dec_MD: Tensor,
    thresholds: Sequence[float] = (0.9, 0.8),
    chunk: int = 4096,
    return_max_cos: bool = False,
) -> dict:
    """Fraction of features with a near-duplicate elsewhere in the dictionary.

    For each L2-normalised decoder row, its maximum signed cosine to any other row
    (self excluded) is computed in ``chunk x chunk`` tiles (no ``M x M`` matrix; cost
    ``~M**2 d / 2``). Returns ``{"redundancy_<t>": fraction of features with max cos > t
    for each t in thresholds, "mean_max_cos": mean of the max cosines}`` as floats; with
    ``return_max_cos=True`` also ``"max_cos_M"``, the per-feature max cosines as a CPU
    float32 tensor (for histograms; drop it before writing JSON). Keys format ``t`` with
    ``str(float(t))``: 0.9 -> ``"redundancy_0.9"``. Needs M >= 2.
    """
    max_cos_M = max_other_cos(unit_rows(W_dec_MD), chunk)
    out: dict = {f"redundancy_{float(t)}": (max_cos_M > t).float().mean().item() for t in thresholds}
    out["mean_max_cos"] = max_cos_M.mean().item()
    if return_max_cos:
        out["max_cos_M"] = max_cos_M.cpu()
    return out


def expert_specialization(
    W_dec_MD: Tensor, n_experts: int, threshold: float = 0.9, seed: int = 0, chunk: int = 4096
) -> dict:
    """Intra- vs inter-expert redundancy (docs/reference.md §3, expert specialization).

    * ``intra_expert_redundancy``: mean over experts of the fraction of that expert's
      ``n = M / N`` features whose max cosine to ANOTHER feature of the SAME expert exceeds
      ``threshold``.
    * ``inter_expert_redundancy``: the same statistic on one random sample of ``n`` features
      drawn without replacement from the whole dictionary (``torch.randperm`` with a CPU
      generator seeded by ``seed``, so the sample depends only on ``M`` and ``seed``).

    Intra well above inter means duplicates concentrate inside experts; intra below inter
    means experts duplicate each other's features. With ``n_experts=1`` the "sample" is the
    whole dictionary, so both values equal ``decoder_redundancy(...)["redundancy_<t>"]``.
    Needs ``n >= 2``.
    """
    U_MD = unit_rows(W_dec_MD)
    M = U_MD.shape[0]
    n = _expert_width(M, n_experts)
    if n < 2:
        raise ValueError(f"need >= 2 features per expert, got n = M / N = {n}")
    intra = (
        sum(
            (max_other_cos(U_MD[i * n : (i + 1) * n], chunk) > threshold).float().mean().item()
            for i in range(n_experts)
        )
        / n_experts
    )
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randperm(M, generator=gen)[:n].to(U_MD.device)
    inter = (max_other_cos(U_MD[sample], chunk) > threshold).float().mean().item()
    return {"intra_expert_redundancy": intra, "inter_expert_redundancy": inter}


@torch.no_grad()
def _abs_cos_sum(A_MD: Tensor, B_MD: Tensor, chunk: int) -> float:
    """Sum of |A B^T| over all entries, in tiles of at most ``chunk x chunk``."""
    total = 0.0
    for r0 in range(0, A_MD.shape[0], chunk):
        for c0 in range(0, B_MD.shape[0], chunk):
            total += (A_MD[r0 : r0 + chunk] @ B_MD[c0 : c0 + chunk].T).abs().double().sum().item()
    return total


@torch.no_grad()
def expert_similarity_matrix(W_dec_MD: Tensor, n_experts: int, absolute: bool = False, chunk: int = 4096) -> Tensor:
    """``[N, N]`` mean cosine between the features of expert i and those of expert j.

    Default (``absolute=False``): mean SIGNED cosine, the primary choice. It is exact and
    cheap: with ``s_i`` the sum of expert i's unit rows, the off-diagonal entries are
    ``s_i . s_j / n**2`` and the diagonal, which excludes the ``n`` self-pairs, is
    ``(|s_i|**2 - sum_a |u_a|**2) / (n (n - 1))`` (``O(M d)``). It measures whether the
    experts' features cluster around shared directions; random directions give ~0.
    ``absolute=True``: mean ``|cos|`` (alignment regardless of sign, noise floor about
    ``sqrt(2 / (pi d))`` for random directions), tiled, ``O(M**2 d)``.
    Returns a symmetric float64 CPU tensor. Needs ``n >= 2`` (the diagonal).
    """
    U_MD = unit_rows(W_dec_MD)
    M = U_MD.shape[0]
    n = _expert_width(M, n_experts)
    if n < 2:
        raise ValueError(f"need >= 2 features per expert, got n = M / N = {n}")
    U_NnD = U_MD.view(n_experts, n, -1)
    if not absolute:
        S_ND = U_NnD.double().sum(dim=1)
        G_NN = S_ND @ S_ND.T
        self_N = U_NnD.double().pow(2).sum(dim=(1, 2))
        sim_NN = G_NN / (n * n)
        sim_NN.diagonal().copy_((G_NN.diagonal() - self_N) / (n * (n - 1)))
        return sim_NN.cpu()
    sim_NN = torch.empty(n_experts, n_experts, dtype=torch.float64)
    for i in range(n_experts):
        for j in range(i, n_experts):
            total = _abs_cos_sum(U_NnD[i], U_NnD[j], chunk)
            if i == j:
                diag = U_NnD[i].double().pow(2).sum().item()  # |cos(u, u)| = |u|^2 (1 or 0)
                sim_NN[i, i] = (total - diag) / (n * (n - 1))
            else:
                sim_NN[i, j] = sim_NN[j, i] = total / (n * n)
    return sim_NN


@torch.no_grad()
def _pair_cos(U_MD: Tensor, a_P: Tensor, b_P: Tensor, chunk: int = 16384) -> Tensor:
    out = [(U_MD[a_P[s : s + chunk]] * U_MD[b_P[s : s + chunk]]).sum(dim=1).cpu() for s in range(0, len(a_P), chunk)]
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def within_between_cosines(
    W_dec_MD: Tensor, n_experts: int, max_pairs: int = 100_000, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Signed cosines of feature pairs within one expert and across two experts (histograms).

    Returns ``(within_P, between_Q)`` float32 CPU tensors of at most ``max_pairs`` each.
    When a population (unordered distinct pairs: ``N n (n-1) / 2`` within,
    ``n**2 N (N-1) / 2`` between) has at most ``max_pairs`` pairs it is enumerated
    exactly (sorted by first index); otherwise ``max_pairs`` pairs are drawn uniformly
    with replacement with a CPU generator seeded by ``seed``. ``n_experts=1`` gives an
    empty ``between``; ``n=1`` an empty ``within``.
    """
    U_MD = unit_rows(W_dec_MD)
    M = U_MD.shape[0]
    N = n_experts
    n = _expert_width(M, N)
    gen = torch.Generator().manual_seed(seed)

    n_within = N * n * (n - 1) // 2
    if n_within <= max_pairs:
        a, b = torch.triu_indices(n, n, offset=1)
        off = (torch.arange(N) * n)[:, None]
        wa, wb = (a[None] + off).reshape(-1), (b[None] + off).reshape(-1)
    else:  # first feature uniform, second uniform among the other n-1 of its expert
        wa = torch.randint(0, M, (max_pairs,), generator=gen)
        local = torch.randint(0, n - 1, (max_pairs,), generator=gen)
        local += (local >= wa % n).long()
        wb = (wa // n) * n + local

    n_between = n * n * N * (N - 1) // 2
    if n_between <= max_pairs:  # then M (M-1)/2 <= 2 max_pairs: enumerating all is cheap
        a, b = torch.triu_indices(M, M, offset=1)
        keep = (a // n) != (b // n)
        ba, bb = a[keep], b[keep]
    else:  # first feature uniform, second uniform in one of the other N-1 experts
        ba = torch.randint(0, M, (max_pairs,), generator=gen)
        other = torch.randint(0, N - 1, (max_pairs,), generator=gen)
        other += (other >= ba // n).long()
        bb = other * n + torch.randint(0, n, (max_pairs,), generator=gen)

    dev = U_MD.device
    return (_pair_cos(U_MD, wa.to(dev), wb.to(dev)), _pair_cos(U_MD, ba.to(dev), bb.to(dev)))


@torch.no_grad()
def activation_similarity(idx_BK: Tensor, acts_BK: Tensor) -> float:
    """Mean overlap of the active-latent sets of a token set, per active latent (Scale paper
    App. A.4, with the measured L0 in place of k).

    ``S_t`` = set of latents ``idx_BK[t, j]`` with ``acts_BK[t, j] > 0`` (global indices;
    repeated indices in a row count once; padding slots of variable-L0 SAEs have value 0 and
    drop out). Returns ``mean over ordered pairs i != j of |S_i ∩ S_j| / L0`` with
    ``L0 = mean_t |S_t|`` MEASURED on these same ``T`` tokens, not the config's ``k``
    (meaningless for ReLU/JumpReLU/Gated, and an over-estimate for any TopK token with
    fewer than k positive values). 1 means every token activates the same set; 0 no shared
    latent. No active latent at all (L0 = 0) gives 0.0.

    Exact, via ``sum_{i != j} |S_i ∩ S_j| = sum_l c_l (c_l - 1)`` where ``c_l`` is the
    number of tokens in which latent ``l`` is active, and ``T L0 = sum_l c_l``; so the
    result is ``sum_l c_l (c_l - 1) / ((T - 1) sum_l c_l)``. Cost ``O(T K log(T K))`` (a
    ``unique`` to deduplicate, then a ``bincount``), memory ``O(T K + M)``: no ``T x T``
    or ``T x M`` matrix. Needs ``T >= 2`` tokens.
    """
    if idx_BK.shape != acts_BK.shape or idx_BK.dim() != 2:
        raise ValueError(f"idx_BK {tuple(idx_BK.shape)} and acts_BK {tuple(acts_BK.shape)} must be the same 2-D shape")
    T = idx_BK.shape[0]
    if T < 2:
        raise ValueError(f"need at least 2 tokens, got {T}")
    active = acts_BK > 0
    idx = idx_BK.long()
    lat = idx[active]
    if lat.numel() == 0:
        return 0.0
    if lat.min() < 0:
        raise ValueError("latent indices must be >= 0")
    tok = torch.arange(T, device=idx.device)[:, None].expand_as(idx)[active]
    width = int(lat.max().item()) + 1
    pairs = torch.unique(tok * width + lat)  # one entry per (token, latent): T * L0 entries
    c_L = torch.bincount(pairs % width).double()
    overlap = (c_L * (c_L - 1)).sum().item()
    return overlap / ((T - 1) * pairs.numel())


class ExpertUsage:
    """Streaming per-expert routing counts, entropy and sorted CDF.

    ``update(expert_B)`` adds a batch of routed experts: one per token ``[B]``, or every
    selected expert ``[B, e]`` (``SAEOutput.experts_BE``), where each (token, expert) pair
    counts once, so the counts then sum to ``e * tokens``. Dense SAEs have
    ``expert_B=None``: pass ``n_tokens`` and they all count towards expert 0 (use
    ``n_experts=1``).
    """

    def __init__(self, n_experts: int = 1):
        if not isinstance(n_experts, int) or n_experts <= 0:
            raise ValueError(f"n_experts must be a positive int, got {n_experts!r}")
        self.n_experts = n_experts
        self._counts_N = torch.zeros(n_experts, dtype=torch.long)

    @torch.no_grad()
    def update(self, expert_B: Tensor | None, n_tokens: int | None = None) -> None:
        """Add one batch; ``expert_B=None`` (dense) needs ``n_tokens``, counted on expert 0."""
        if expert_B is None:
            if n_tokens is None:
                raise ValueError("expert_B=None (dense SAE) needs n_tokens")
            self._counts_N[0] += int(n_tokens)
            return
        e = expert_B.detach().reshape(-1).long().cpu()
        if e.numel() and (e.min() < 0 or e.max() >= self.n_experts):
            raise ValueError(f"expert ids must be in [0, {self.n_experts}), got [{e.min().item()}, {e.max().item()}]")
        self._counts_N += torch.bincount(e, minlength=self.n_experts)

    @property
    def counts(self) -> Tensor:
        """(Token, expert) routings per expert, int64 ``[N]`` (a copy)."""
        return self._counts_N.clone()

    @property
    def n_tokens(self) -> int:
        """Sum of the counts: the tokens for ``[B]`` updates, ``e`` x the tokens for
        ``[B, e]`` updates (the name predates multi-expert routing)."""
        return int(self._counts_N.sum().item())

    def _shares(self) -> Tensor:
        total = self.n_tokens
        if total == 0:
            raise ValueError("ExpertUsage has no tokens yet")
        return self._counts_N.double() / total

    def entropy(self) -> tuple[float, float]:
        """``(H, H / log N)``: entropy (nats) of the routing distribution and its
        normalised value (1 = uniform, 0 = all tokens on one expert). For ``N = 1`` the
        normalised entropy is defined as 1.0 (a single expert is trivially balanced)."""
        p = self._shares()
        H = -(p[p > 0] * p[p > 0].log()).sum().item()
        H = max(H, 0.0)  # no -0.0
        norm = H / math.log(self.n_experts) if self.n_experts > 1 else 1.0
        return H, norm

    def sorted_cdf(self) -> list[float]:
        """Cumulative token share of the experts sorted by descending count (length N,
        non-decreasing, last exactly 1.0)."""
        total = self.n_tokens
        if total == 0:
            raise ValueError("ExpertUsage has no tokens yet")
        cum = self._counts_N.sort(descending=True).values.cumsum(0)
        return [int(c) / total for c in cum]

    def summary(self) -> dict:
        """JSON-ready dict: counts, n_tokens, entropy (nats), entropy_normalised, sorted_cdf."""
        H, norm = self.entropy()
        return {
            "counts": self._counts_N.tolist(),
            "n_tokens": self.n_tokens,
            "entropy": H,
            "entropy_normalised": norm,
            "sorted_cdf": self.sorted_cdf(),
        }
