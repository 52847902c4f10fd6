"""Known-answer tests for saepipe.evaluate.geometry (dictionary geometry, routing metrics)."""

from __future__ import annotations

import math
from math import comb

import pytest
import torch

from saepipe.evaluate.geometry import (
    ExpertUsage,
    activation_similarity,
    decoder_redundancy,
    expert_similarity_matrix,
    expert_specialization,
    within_between_cosines,
)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _dense_max_cos(W_MD: torch.Tensor) -> torch.Tensor:
    U = torch.nn.functional.normalize(W_MD.double(), dim=1)
    G = U @ U.T
    G.fill_diagonal_(-math.inf)
    return G.max(dim=1).values


# ---- decoder_redundancy --------------------------------------------------------------------


def test_redundancy_exact_duplicates():
    base = _randn(10, 64)
    # duplicates of the first 3 rows, rescaled (redundancy is about directions, not norms)
    W = torch.cat([base, 2.5 * base[:3]])
    out = decoder_redundancy(W, return_max_cos=True)
    assert out["redundancy_0.9"] == pytest.approx(6 / 13)
    assert out["redundancy_0.8"] == pytest.approx(6 / 13)
    max_cos = out["max_cos_M"]
    assert max_cos.shape == (13,)
    dup = torch.tensor([0, 1, 2, 10, 11, 12])
    assert torch.allclose(max_cos[dup], torch.ones(6), atol=1e-5)
    rest = torch.tensor([3, 4, 5, 6, 7, 8, 9])
    assert (max_cos[rest] < 0.6).all()  # random 64-d directions are far apart
    assert out["mean_max_cos"] == pytest.approx(max_cos.mean().item())
    assert isinstance(out["redundancy_0.9"], float) and isinstance(out["mean_max_cos"], float)


def test_redundancy_orthogonal_and_antiparallel():
    out = decoder_redundancy(3.0 * torch.eye(8, 16))
    assert out == {"redundancy_0.9": 0.0, "redundancy_0.8": 0.0, "mean_max_cos": 0.0}
    # cosines are signed: an anti-parallel pair is not redundant
    e = torch.eye(3)
    W = torch.stack([e[0], -e[0], e[1]])
    out = decoder_redundancy(W, thresholds=(0.5,), return_max_cos=True)
    assert out["redundancy_0.5"] == 0.0
    assert torch.equal(out["max_cos_M"], torch.zeros(3))
    assert "max_cos_M" not in decoder_redundancy(e)


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 1000])
def test_redundancy_chunked_matches_dense(chunk):
    base = _randn(30, 16, seed=1)
    near = base[:7] + 0.3 * _randn(7, 16, seed=2)  # a spread of high cosines
    W = torch.cat([base, near])  # M = 37
    ref = _dense_max_cos(W)
    out = decoder_redundancy(W, thresholds=(0.9, 0.8, 0.5), chunk=chunk, return_max_cos=True)
    assert torch.allclose(out["max_cos_M"].double(), ref, atol=1e-5)
    for t in (0.9, 0.8, 0.5):
        assert out[f"redundancy_{t}"] == pytest.approx((ref > t).double().mean().item())
    assert out["mean_max_cos"] == pytest.approx(ref.mean().item(), abs=1e-5)
    assert 0 < out["redundancy_0.5"] < 1


def test_redundancy_needs_two_features():
    with pytest.raises(ValueError):
        decoder_redundancy(torch.ones(1, 4))


# ---- expert_specialization -----------------------------------------------------------------


def _expert0_duplicated(M=16, n=4, d=64):
    """Expert 0 = n copies of one direction; every other row a random direction."""
    W = _randn(M, d, seed=3)
    W[1:n] = W[0] * torch.tensor([1.0, 2.0, 0.5])[:, None]
    return W


def test_specialization_exact_intra_and_seeded_inter():
    W = _expert0_duplicated()
    out = expert_specialization(W, n_experts=4, seed=0)
    assert out["intra_expert_redundancy"] == pytest.approx(1.0 / 4)  # expert 0: 4/4, others 0
    # documented sampling: randperm(M) with a CPU generator seeded by `seed`, first n rows.
    sample = torch.randperm(16, generator=torch.Generator().manual_seed(0))[:4]
    x = int((sample < 4).sum())  # rows of expert 0 in the sample; they duplicate each other
    assert out["inter_expert_redundancy"] == pytest.approx(x / 4 if x >= 2 else 0.0)


def test_specialization_inter_is_a_sample_without_replacement(one_thread):
    # Over many seeds the inter statistic averages to its exact hypergeometric expectation:
    # X ~ Hypergeom(16 rows, 4 of expert 0, 4 drawn); value = X/4 if X >= 2 else 0.
    W = _expert0_duplicated()
    expected = sum(x / 4 * comb(4, x) * comb(12, 4 - x) for x in (2, 3, 4)) / comb(16, 4)
    vals = [expert_specialization(W, 4, seed=s)["inter_expert_redundancy"] for s in range(150)]
    assert sum(vals) / len(vals) == pytest.approx(expected, abs=0.06)  # expected = 0.129
    assert len(set(vals)) > 1  # the seed changes the sample


def test_specialization_cross_expert_duplicates_are_not_intra():
    # every expert holds the same 4 directions: no duplicates inside an expert
    W = _randn(4, 64, seed=4).repeat(4, 1)
    out = expert_specialization(W, n_experts=4, seed=0)
    assert out["intra_expert_redundancy"] == 0.0
    sample = torch.randperm(16, generator=torch.Generator().manual_seed(0))[:4]
    direction = sample % 4
    dup = sum(int((direction == direction[i]).sum() > 1) for i in range(4))
    assert out["inter_expert_redundancy"] == pytest.approx(dup / 4)


def test_specialization_single_expert_equals_whole_dictionary():
    base = _randn(10, 64)
    W = torch.cat([base, base[:3]])  # M = 13, 6 redundant
    out = expert_specialization(W, n_experts=1, seed=7)
    assert out["intra_expert_redundancy"] == pytest.approx(6 / 13)
    assert out["inter_expert_redundancy"] == pytest.approx(6 / 13)
    with pytest.raises(ValueError):
        expert_specialization(W, n_experts=2)  # 13 rows not divisible


# ---- expert_similarity_matrix / within_between_cosines -------------------------------------


def test_expert_similarity_matrix_hand_case():
    e = torch.eye(4)
    u = (e[0] + e[1]) / math.sqrt(2)
    W = torch.stack([e[0], 3 * u, -e[0], e[2]])  # expert 0 = {e0, u}, expert 1 = {-e0, e2}
    r = 1 / math.sqrt(2)
    signed = expert_similarity_matrix(W, 2)
    ref = torch.tensor([[r, (-1 - r) / 4], [(-1 - r) / 4, 0.0]], dtype=torch.float64)
    assert torch.allclose(signed, ref, atol=1e-6)
    absolute = expert_similarity_matrix(W, 2, absolute=True, chunk=1)
    assert torch.allclose(absolute, ref.abs(), atol=1e-6)


@pytest.mark.parametrize("absolute", [False, True])
def test_expert_similarity_matrix_matches_brute_force(absolute):
    W = _randn(24, 6, seed=5) + torch.tensor([1.0, 0, 0, 0, 0, 0])  # shared offset: mean cos > 0
    N, n = 3, 8
    U = torch.nn.functional.normalize(W.double(), dim=1)
    G = U @ U.T
    if absolute:
        G = G.abs()
    ref = torch.empty(N, N, dtype=torch.float64)
    for i in range(N):
        for j in range(N):
            block = G[i * n : (i + 1) * n, j * n : (j + 1) * n]
            ref[i, j] = (block.sum() - block.diagonal().sum()) / (n * (n - 1)) if i == j else block.mean()
    got = expert_similarity_matrix(W, N, absolute=absolute, chunk=3)
    assert got.shape == (N, N)
    assert torch.allclose(got, ref, atol=1e-6)


def _tagged_dictionary(N: int, n: int) -> torch.Tensor:
    """Feature (i, j) = e_i + e_{N + i n + j}: cos 0.5 within an expert, 0 across, 1 to self."""
    M = N * n
    W = torch.zeros(M, N + M)
    for f in range(M):
        W[f, f // n] = 1.0
        W[f, N + f] = 1.0
    return W


def test_within_between_exact_enumeration():
    e = torch.eye(4)
    W = torch.stack([e[0], e[0] + e[1], e[2], -e[0]])  # experts {0, 1}, {2, 3}
    within, between = within_between_cosines(W, 2, max_pairs=100)
    r = 1 / math.sqrt(2)
    assert torch.allclose(within, torch.tensor([r, 0.0]), atol=1e-6)  # pairs (0,1), (2,3)
    # pairs (0,2), (0,3), (1,2), (1,3)
    assert torch.allclose(between, torch.tensor([0.0, -1.0, 0.0, -r]), atol=1e-6)


def test_within_between_sampled_membership_and_size():
    W = _tagged_dictionary(N=4, n=16)  # within pairs 480, between 1536
    within, between = within_between_cosines(W, 4, max_pairs=300, seed=1)
    assert within.shape == (300,) and between.shape == (300,)
    assert torch.allclose(within, torch.full((300,), 0.5), atol=1e-6)  # never a self-pair
    assert torch.allclose(between, torch.zeros(300), atol=1e-6)  # never the same expert
    again = within_between_cosines(W, 4, max_pairs=300, seed=1)
    assert torch.equal(again[0], within) and torch.equal(again[1], between)
    # exact enumeration when the populations fit
    within, between = within_between_cosines(W, 4, max_pairs=2000)
    assert within.shape == (480,) and between.shape == (1536,)
    # a single expert has no between pairs
    within, between = within_between_cosines(W, 1, max_pairs=10)
    assert within.shape == (10,) and between.numel() == 0


# ---- activation_similarity -----------------------------------------------------------------


def test_activation_similarity_hand_cases():
    ones = torch.ones(2, 3)
    same = torch.tensor([[1, 2, 3], [3, 2, 1]])
    assert activation_similarity(same, ones) == pytest.approx(1.0)
    assert activation_similarity(torch.tensor([[1, 2, 3], [4, 5, 6]]), ones) == 0.0
    # S0={0,1,2}, S1={1,2,5}, S2={2,7,8}: |S0∩S1|=2, |S0∩S2|=1, |S1∩S2|=1, L0 = 3
    # -> 2 * (2 + 1 + 1) / (6 ordered pairs * L0=3) = 8 / 18
    idx = torch.tensor([[0, 1, 2], [5, 2, 1], [8, 7, 2]])
    assert activation_similarity(idx, torch.ones(3, 3)) == pytest.approx(4 / 9)


def test_activation_similarity_divides_by_the_measured_l0():
    # 4 slots per token (k = 4) but variable active sets, as for ReLU/JumpReLU/Gated:
    # S0={0,1}, S1={1}, S2={1,2,3}; measured L0 = (2 + 1 + 3) / 3 = 2 (not k = 4).
    # Every pair shares exactly latent 1: mean overlap 1 -> similarity 1 / L0 = 1/2 (k: 1/4)
    idx = torch.tensor([[0, 1, 9, 9], [1, 9, 9, 9], [1, 2, 3, 9]])
    acts = torch.tensor([[1.0, 2.0, 0, 0], [0.5, 0, 0, 0], [1.0, 1.0, 3.0, 0]])
    assert activation_similarity(idx, acts) == pytest.approx(1 / 2)
    # identical active sets give 1 whatever their size and the padding
    idx = torch.tensor([[4, 7, 0, 0], [7, 4, 0, 0], [4, 7, 4, 0]])
    acts = torch.tensor([[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0], [1.0, 1.0, 1.0, 0]])
    assert activation_similarity(idx, acts) == pytest.approx(1.0)


def test_activation_similarity_ignores_inactive_slots():
    idx = torch.tensor([[1, 2, 3], [1, 2, 3]])
    acts = torch.tensor([[0.5, 0.0, 2.0], [1.0, 1.0, 1.0]])
    # S0={1,3}, S1={1,2,3}: overlap 2, L0 = 2.5
    assert activation_similarity(idx, acts) == pytest.approx(2 / 2.5)
    assert activation_similarity(idx, torch.zeros(2, 3)) == 0.0  # L0 = 0


def test_activation_similarity_matches_brute_force():
    g = torch.Generator().manual_seed(6)
    T, K, M = 60, 5, 25
    idx = torch.stack([torch.randperm(M, generator=g)[:K] for _ in range(T)])
    acts = torch.rand(T, K, generator=g) - 0.2  # some slots inactive
    sets = [{int(i) for i, a in zip(idx[t], acts[t]) if a > 0} for t in range(T)]
    overlap = sum(len(sets[i] & sets[j]) for i in range(T) for j in range(T) if i != j)
    l0 = sum(len(s) for s in sets) / T
    assert l0 < K  # the measured L0, not K, is the denominator
    ref = overlap / (T * (T - 1) * l0)
    assert activation_similarity(idx, acts) == pytest.approx(ref)
    with pytest.raises(ValueError):
        activation_similarity(idx[:1], acts[:1])


# ---- ExpertUsage ---------------------------------------------------------------------------


def test_expert_usage_counts_entropy_cdf():
    usage = ExpertUsage(4)
    usage.update(torch.tensor([1, 1, 3, 0, 1]))
    usage.update(torch.tensor([3, 3, 1, 3, 1]))
    assert usage.counts.tolist() == [1, 5, 0, 4]
    assert usage.n_tokens == 10
    assert usage.sorted_cdf() == pytest.approx([0.5, 0.9, 1.0, 1.0])
    assert usage.sorted_cdf()[-1] == 1.0
    p = torch.tensor([0.1, 0.5, 0.4], dtype=torch.float64)
    H_ref = -(p * p.log()).sum().item()
    H, Hn = usage.entropy()
    assert H == pytest.approx(H_ref) and Hn == pytest.approx(H_ref / math.log(4))
    s = usage.summary()
    assert s["counts"] == [1, 5, 0, 4] and s["entropy"] == pytest.approx(H_ref)
    assert all(type(v) is float for v in s["sorted_cdf"])


def test_expert_usage_uniform_collapse_and_dense():
    uniform = ExpertUsage(8)
    uniform.update(torch.arange(8).repeat(3))
    H, Hn = uniform.entropy()
    assert H == pytest.approx(math.log(8)) and Hn == pytest.approx(1.0)
    assert uniform.sorted_cdf() == pytest.approx([(i + 1) / 8 for i in range(8)])
    collapsed = ExpertUsage(8)
    collapsed.update(torch.full((20,), 5))
    assert collapsed.entropy() == (0.0, 0.0)
    assert collapsed.sorted_cdf() == [1.0] * 8
    dense = ExpertUsage(1)
    dense.update(None, n_tokens=7)
    assert dense.counts.tolist() == [7] and dense.entropy() == (0.0, 1.0)
    with pytest.raises(ValueError):
        dense.update(None)
    with pytest.raises(ValueError):
        collapsed.update(torch.tensor([8]))
    with pytest.raises(ValueError):
        ExpertUsage(2).entropy()


def test_expert_usage_counts_every_routed_expert():
    # experts_BE [B, e=2] (column 0 = top-1): every (token, expert) pair counts once
    usage = ExpertUsage(4)
    usage.update(torch.tensor([[0, 2], [2, 1], [2, 0]]))
    usage.update(torch.tensor([[3, 2]]))
    assert usage.counts.tolist() == [2, 1, 4, 1]  # top-1 only would be [1, 0, 2, 1]
    assert usage.n_tokens == 2 * 4  # e x tokens
    assert usage.sorted_cdf() == pytest.approx([4 / 8, 6 / 8, 7 / 8, 1.0])
    p = torch.tensor([2, 1, 4, 1], dtype=torch.float64) / 8
    H, Hn = usage.entropy()
    assert H == pytest.approx(-(p * p.log()).sum().item()) and Hn == pytest.approx(H / math.log(4))
