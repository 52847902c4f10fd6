"""The fast kernels of saepipe.saes against naive dense references: values and the gradient of
every input/parameter (fp32 tolerance), at tiny shapes.

Covers: the sparse decode and its weight gradient, topk_linear with AuxK (none, few, many and
all latents dead), gather_linear, the batch-wide top-k, the fused dense-code kernels (ReLU,
JumpReLU, Gated: every output's gradient, STE window), the SAEs' fused training step (dense
code, lazily built sparse output, dead statistics), BatchTopK AuxK, autocast, the scratch
pool and the public saved-tensor hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from saepipe.saes import SAEOutput, build_sae, dense_code, kernels

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(rtol=1e-4, atol=1e-5)


def leaf(*shape, scale=1.0, shift=0.0):
    return (torch.randn(*shape) * scale + shift).requires_grad_(True)


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True)


def assert_grads_close(fast, naive):
    for i, (a, b) in enumerate(zip(fast, naive, strict=True)):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, i=i: f"input {i}: {m}")


# ---- sparse decode / bag weight gradient ------------------------------------------------
def test_sparse_decode_and_weight_grad_match_dense():
    torch.manual_seed(0)
    B, K, M, D = 37, 5, 23, 7
    idx = torch.randint(0, M, (B, K))
    idx[0] = 3  # repeated index in one row
    acts, W = leaf(B, K), leaf(M, D)
    with torch.no_grad():
        acts[1] = 0.0  # zero weights (padding) add nothing
    R = torch.randn(B, D)
    fast = kernels.sparse_decode(idx, acts, W)
    z_BM = torch.zeros(B, M).scatter_add(1, idx, acts)
    naive = z_BM @ W
    torch.testing.assert_close(fast, naive, **TOL)
    assert_grads_close(grads_of((fast * R).sum(), [acts, W]), grads_of((naive * R).sum(), [acts, W]))
    G = kernels.bag_weight_grad(idx, acts.detach(), R, M)
    rows_SD = (acts.detach()[..., None] * R[:, None]).reshape(-1, D)
    torch.testing.assert_close(G, torch.zeros(M, D).index_add_(0, idx.reshape(-1), rows_SD), **TOL)


def test_bag_acts_grad_is_embedding_bags_own_gradient_bit_for_bit():
    """Rows as bags (sparse_decode) and runs of entries as bags (Matryoshka's prefixes)."""
    torch.manual_seed(0)
    M, D, S = 23, 7, 60
    W = torch.randn(M, D)
    idx_S, acts_S = torch.randint(0, M, (S,)), torch.randn(S, requires_grad=True)
    for offsets_N in (torch.arange(0, S, 5), torch.tensor([0, 0, 7, 30, 31, 59])):  # empty bags too
        bag_S = torch.bucketize(torch.arange(S), offsets_N, right=True) - 1
        y_ND = F.embedding_bag(idx_S, W, offsets_N, per_sample_weights=acts_S, mode="sum")
        g_N = torch.randn_like(y_ND)
        (expected,) = torch.autograd.grad(y_ND, acts_S, g_N)
        assert torch.equal(kernels.bag_acts_grad(g_N, W, idx_S, offsets_N, bag_S), expected)
        torch.testing.assert_close(expected, (g_N[bag_S] * W[idx_S]).sum(1))


# ---- row-wise top-k ------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["random", "ties", "masked", "blocks_of_4", "narrow"])
def test_row_topk_is_torch_topk(case):
    """The blocked CPU search selects the same values as torch.topk (as a set per row), and
    its indices point at them; ties (integer values) and -inf-masked columns included."""
    torch.manual_seed(7)
    B, M, k = 37, 512, 16  # 64 blocks of 8 columns >= 4 k: the blocked path
    block = {"blocks_of_4": 4, "narrow": None}.get(case, 8)
    if case == "blocks_of_4":  # 8 does not divide M (or leaves too few blocks): 4 columns
        M = 516
    elif case == "narrow":  # too few blocks: torch.topk itself
        k = 40
    f = torch.randn(B, M)
    if case == "ties":
        f = torch.randint(0, 6, (B, M)).float()
    elif case == "masked":  # as dead_topk leaves a row: most columns -inf
        f[:, torch.rand(M) < 0.9] = float("-inf")
        k = 8
    assert kernels._row_topk_block(M, k) == block
    vals, idx = kernels.row_topk(f, k)
    ref = f.topk(k, dim=1).values
    torch.testing.assert_close(vals.sort(1).values, ref.sort(1).values)
    torch.testing.assert_close(f.gather(1, idx), vals)
    assert all(len(set(row)) == k for row in idx.tolist())  # k distinct latents per row


# ---- topk_linear with AuxK -----------------------------------------------------------------
def naive_topk_linear(x, W, b, k, dead_M, k_aux):
    pre = x @ W + b
    vals, idx = pre.topk(k, dim=1)
    if dead_M is None or k_aux == 0:
        return vals, idx, pre[:, :0], idx[:, :0]
    sel = pre.detach().masked_fill(~dead_M, float("-inf")).topk(k_aux, dim=1).indices
    return vals, idx, pre.gather(1, sel), sel


@pytest.mark.parametrize(
    "dead,k,k_aux",
    [("none", 4, 0), ("few", 4, 3), ("many", 4, 6), ("all", 4, 9), ("all", 6, 2), ("all", 5, 5)],
)
def test_topk_linear_with_auxk_matches_naive(dead, k, k_aux):
    torch.manual_seed(1)
    B, D, M = 29, 6, 40
    x, W, b = leaf(B, D), leaf(D, M), leaf(M, scale=0.1)
    n_dead = {"none": 0, "few": 6, "many": 30, "all": M}[dead]
    dead_M = torch.zeros(M, dtype=torch.bool)
    dead_M[torch.randperm(M)[:n_dead]] = True
    mask = dead_M if n_dead else None
    fast = kernels.topk_linear(x, W, b, k, mask, k_aux if n_dead else 0)
    naive = naive_topk_linear(x, W, b, k, mask, k_aux if n_dead else 0)
    R1, R2 = torch.randn(B, k), torch.randn(B, k_aux if n_dead else 0)

    def loss(vals, idx, vals_aux, idx_aux):
        order, order_aux = idx.argsort(1), idx_aux.argsort(1)  # compare as sets per row
        return (vals.gather(1, order) * R1).sum() + (vals_aux.gather(1, order_aux) * R2).sum()

    # every latent dead and k_aux > k: the aux outputs are the rest beyond the main top-k
    assert fast.aux_rest == (dead == "all" and k_aux > k)
    if fast.aux_rest:
        fast = (fast.vals_BK, fast.idx_BK, torch.cat(fast[:3:2], 1), torch.cat(fast[1:4:2], 1))
    for a, c in zip(fast[:4], naive, strict=True):
        torch.testing.assert_close(a.sort(1).values, c.sort(1).values)
    assert (~dead_M[fast[3]]).sum() == 0  # AuxK picks dead latents only
    assert_grads_close(grads_of(loss(*fast[:4]), [x, W, b]), grads_of(loss(*naive), [x, W, b]))


@pytest.mark.parametrize("n_dead,k,k_aux", [(1001, 8, 20), (5, 8, 5), (2045, 8, 20), (700, 40, 64), (1100, 8, 64)])
def test_topk_linear_with_some_dead_searches_dead_and_live_apart(n_dead, k, k_aux):
    """Wide enough for row_topk's block search in both parts (blocks of 8, and of 4 in the dead
    part of the last case), neither part a whole number of blocks (padded with -inf columns),
    fewer dead than k, fewer live than k: the same values and gradients as the naive top-k
    and AuxK."""
    torch.manual_seed(3)
    B, D, M = 33, 8, 2048
    x, W, b = leaf(B, D), leaf(D, M), leaf(M, scale=0.1)
    dead_M = torch.zeros(M, dtype=torch.bool)
    dead_M[torch.randperm(M)[:n_dead]] = True
    fast = kernels.topk_linear(x, W, b, k, dead_M, k_aux)
    naive = naive_topk_linear(x, W, b, k, dead_M, k_aux)
    assert not fast.aux_rest and dead_M[fast.idx_aux_BA].all()
    for a, c in zip(fast[:4], naive, strict=True):
        torch.testing.assert_close(a.sort(1).values, c.sort(1).values)
    R1, R2 = torch.randn(B, k), torch.randn(B, k_aux)

    def loss(vals, idx, vals_aux, idx_aux):  # compare as sets per row
        return (vals.gather(1, idx.argsort(1)) * R1).sum() + (vals_aux.gather(1, idx_aux.argsort(1)) * R2).sum()

    assert_grads_close(grads_of(loss(*fast[:4]), [x, W, b]), grads_of(loss(*naive), [x, W, b]))


@pytest.mark.parametrize("M,n_dead,k,k_aux", [(64, 5, 4, 5), (2048, 1001, 8, 20)])
def test_topk_linear_with_some_dead_keeps_to_real_latents_on_nan_inputs(M, n_dead, k, k_aux):
    """NaN activations (a diverged run: the trainer must see a NaN loss, not an IndexError):
    the -inf padding columns of the dead/live parts are never selected, though torch.topk
    ranks NaN above everything."""
    B, D = 16, 8
    x, W, b = torch.full((B, D), float("nan")), torch.randn(D, M), torch.zeros(M)
    dead_M = torch.zeros(M, dtype=torch.bool)
    dead_M[torch.randperm(M, generator=torch.Generator().manual_seed(0))[:n_dead]] = True
    sel = kernels.topk_linear(x, W, b, k, dead_M, k_aux)
    assert dead_M[sel.idx_aux_BA].all() and (sel.idx_BK < M).all() and sel.vals_BK.isnan().all()


def test_gather_linear_padding_gets_no_gradient():
    torch.manual_seed(2)
    B, D, M = 11, 5, 17
    x, W, b = leaf(B, D), leaf(D, M), leaf(M)
    mask = torch.rand(B, M) < 0.3
    idx, valid = kernels.padded_indices(mask)
    with torch.no_grad():
        pre = x @ W + b
    vals = kernels.gather_linear(x, W, b, pre, idx, valid)
    torch.testing.assert_close(vals[valid], pre[mask])  # row-major order on both sides
    R = torch.randn(vals.shape)
    naive = ((x @ W + b) * mask * torch.zeros(B, M).scatter_add(1, idx, R * valid)).sum()
    assert_grads_close(grads_of((vals * R).sum(), [x, W, b]), grads_of(naive, [x, W, b]))


# ---- batch-wide top-k ----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["random", "skewed", "few_positive", "everything"])
def test_batch_topk_is_the_flat_topk(case):
    torch.manual_seed(3)
    B, M = 64, 300
    f = torch.randn(B, M).relu_()
    n = 8 * B
    if case == "skewed":  # one row holds most of the batch's largest values
        f[5] *= 50
    elif case == "few_positive":  # fewer positives than n: zeros are selected too
        f = torch.randn(B, M).sub_(2.5).relu_()
    elif case == "everything":
        n = B * M
    rows, cols, vals = kernels.batch_topk(f, n)
    assert len(rows) == n and bool((rows[1:] >= rows[:-1]).all())
    torch.testing.assert_close(vals, f[rows, cols])
    torch.testing.assert_close(vals.sort().values, f.reshape(-1).topk(n).values.sort().values)
    assert len(set((rows * M + cols).tolist())) == n


# ---- fused dense-code kernels --------------------------------------------------------------
def dense_inputs(B=19, D=6, M=33):
    torch.manual_seed(4)
    return leaf(B, D, shift=0.3), leaf(D), leaf(D, M, scale=0.5), leaf(M, scale=0.2), leaf(M, D, scale=0.5)


def output_loss(outs, Rs):
    return sum((o * R).sum() for o, R in zip(outs, Rs, strict=True))


def test_relu_dense_matches_naive():
    x, b_dec, W_enc, b_enc, W_dec = params = dense_inputs()
    fast = dense_code.relu_dense(*params)
    f = F.relu((x - b_dec) @ W_enc + b_enc)
    naive = (f @ W_dec, f, f.sum(0))
    Rs = [torch.randn(o.shape) for o in naive]  # every output reaches the loss
    for a, c in zip(fast, naive, strict=True):
        torch.testing.assert_close(a, c, **TOL)
    assert_grads_close(grads_of(output_loss(fast, Rs), params), grads_of(output_loss(naive, Rs), params))
    # the decoder output alone (the other outputs' gradients are None)
    assert_grads_close(grads_of((fast[0] * Rs[0]).sum(), params), grads_of((naive[0] * Rs[0]).sum(), params))


@pytest.mark.parametrize("negative_theta", [False, True])
def test_jumprelu_dense_matches_the_ste(negative_theta):
    x, b_dec, W_enc, b_enc, W_dec = dense_inputs()
    eps = 0.3  # wide window: many entries on both of its sides
    theta = (torch.rand(W_enc.shape[1]) * 0.6 - (0.4 if negative_theta else 0.0)).requires_grad_(True)
    params = (x, b_dec, W_enc, b_enc, theta, W_dec)
    fast = dense_code.jumprelu_dense(x, b_dec, W_enc, b_enc, theta, W_dec, eps)
    r = F.relu((x - b_dec) @ W_enc + b_enc)
    H = (r > theta).float().detach()
    K = ((r - theta).abs() < eps / 2).float().detach()
    zero_t = theta - theta.detach()  # value 0, gradient 1 w.r.t. theta
    f = r * H - (theta.detach() / eps) * K * zero_t
    naive = (f @ W_dec, f, (H - K / eps * zero_t).sum())
    assert K.sum() > 0 and (K * (1 - H)).sum() > 0  # window hit on the inactive side too
    Rs = [torch.randn(o.shape) for o in naive]
    for a, c in zip(fast, naive, strict=True):
        torch.testing.assert_close(a, c, **TOL)
    assert_grads_close(grads_of(output_loss(fast, Rs), params), grads_of(output_loss(naive, Rs), params))


def test_gated_dense_matches_naive():
    x, b_dec, W, _, W_dec = dense_inputs()
    M = W.shape[1]
    b_gate, r_mag, b_mag = leaf(M, scale=0.3), leaf(M, scale=0.3), leaf(M, scale=0.3)
    params = (x, b_dec, W, b_gate, r_mag, b_mag, W_dec)
    fast = dense_code.gated_dense(*params)
    p = (x - b_dec) @ W
    pi = p + b_gate
    f = (pi > 0).float() * F.relu(p * r_mag.exp() + b_mag)
    naive = (f @ W_dec, F.relu(pi) @ W_dec.detach(), f, F.relu(pi).sum(0))
    Rs = [torch.randn(o.shape) for o in naive]
    for a, c in zip(fast, naive, strict=True):
        torch.testing.assert_close(a, c, **TOL)
    assert_grads_close(grads_of(output_loss(fast, Rs), params), grads_of(output_loss(naive, Rs), params))


# ---- the SAEs' fused training step ----------------------------------------------------------
ARCH_KW = {
    "relu": {"l1_warmup_tokens": 0},
    "jumprelu": {"bandwidth": 0.2, "threshold_init": 0.05, "enc_init_norm": 1.0},
    "gated": {"enc_init_norm": 1.0},
}


def wide_sae(arch):
    torch.manual_seed(5)
    sae = build_sae({"arch": arch, "d_in": 8, "width": 48, "k": 4, "act_norm_factor": 0.7, **ARCH_KW[arch]})
    x = torch.randn(40, 8) + 0.2
    sae.init_from_batch(x)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
        (sae.b_gate if arch == "gated" else sae.b_enc)[:4] = -100.0  # latents that never fire
    return sae, x


@pytest.mark.parametrize("arch", list(ARCH_KW))
def test_fused_step_equals_the_sparse_step(arch, monkeypatch):
    """The dense (fused) and the sparse training paths: same losses, gradients, code, dead
    statistics; the fused step's sparse code is built on first access only."""
    results = []
    for fill in (0.0, float("inf")):  # 0: always fused; inf: always sparse
        monkeypatch.setattr(kernels, "DENSE_TRAIN_MIN_FILL", fill)
        sae, x = wide_sae(arch)
        sae.tokens_since_fired.fill_(7)
        out = sae(x)
        assert isinstance(out, SAEOutput) and (out.dense_BM is not None) == (fill == 0.0)
        if fill == 0.0:
            assert out._acts_BK is None  # not built yet
        R = torch.randn(out.x_hat_BD.shape)
        loss = sum(out.losses.values()) + (out.x_hat_BD * R).sum() * 1e-2
        if arch != "jumprelu":  # (its sparse path's code also holds the STE window's zeros)
            loss = loss + out.acts_BK.sum() * 1e-3  # gradients through the lazily built code
        loss.backward()
        grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
        active = out.acts_BK > 0
        code = torch.zeros(len(x), 48).scatter_add(1, out.idx_BK, out.acts_BK.detach())
        results.append((out.losses, grads, code, active.sum(1), sae.tokens_since_fired.clone()))
    (l_a, g_a, c_a, n_a, t_a), (l_b, g_b, c_b, n_b, t_b) = results
    torch.testing.assert_close(l_a, l_b, **TOL)
    torch.testing.assert_close(g_a, g_b, **TOL)
    torch.testing.assert_close(c_a, c_b, **TOL)
    assert torch.equal(n_a, n_b) and torch.equal(t_a, t_b) and n_a.float().mean() > 8  # a wide code
    assert (t_a == 0).any() and (t_a == 7 + 40).any()  # some latents fired, some did not


def test_topk_auxk_all_dead_and_batchtopk_auxk_match_naive():
    torch.manual_seed(6)
    for arch in ("topk", "batchtopk"):
        sae = build_sae({"arch": arch, "d_in": 8, "width": 40, "k": 3, "k_aux": 7, "dead_tokens": 5})
        x = torch.randn(30, 8)
        with torch.no_grad():
            sae.b_enc.add_(0.1 * torch.randn(40))
        sae.tokens_since_fired.fill_(100)  # every latent dead
        out = sae(x)
        sum(out.losses.values()).backward()
        g_fast = {n: p.grad.clone() for n, p in sae.named_parameters()}
        sae.zero_grad()
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        f = F.relu(pre)
        if arch == "topk":
            sel = f.topk(3, dim=1).indices
        else:
            flat = f.detach().reshape(-1).topk(3 * 30).indices
            sel_mask = torch.zeros(f.numel()).scatter(0, flat, 1.0).view_as(f)
        z = f * torch.zeros_like(f).scatter(1, sel, 1.0) if arch == "topk" else f * sel_mask
        x_hat = z @ sae.W_dec + sae.b_dec
        aux_sel = pre.detach().topk(7, dim=1).indices
        e = (x - x_hat).detach()
        e_hat = (F.relu(pre) * torch.zeros_like(pre).scatter(1, aux_sel, 1.0)) @ sae.W_dec
        auxk = sae.cfg.aux_coeff * (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
        losses = {"mse": (x - x_hat).pow(2).mean(), "auxk": auxk}
        torch.testing.assert_close(out.losses, losses, **TOL)
        sum(losses.values()).backward()
        torch.testing.assert_close(g_fast, {n: p.grad for n, p in sae.named_parameters()}, **TOL)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "gated", "topk", "batchtopk"])
def test_bf16_autocast_step_runs_and_is_close(arch, monkeypatch):
    monkeypatch.setattr(kernels, "DENSE_TRAIN_MIN_FILL", 0.0)  # the fused kernels where there are some
    sae, x = wide_sae(arch) if arch in ARCH_KW else (build_sae({"arch": arch, "d_in": 8, "width": 48, "k": 4}), None)
    x = torch.randn(40, 8) if x is None else x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sum(sae(x).losses.values())
    loss.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in sae.parameters())
    g16 = torch.cat([p.grad.flatten() for p in sae.parameters() if p.grad is not None])
    sae.zero_grad()
    sum(sae(x).losses.values()).backward()
    g32 = torch.cat([p.grad.flatten() for p in sae.parameters() if p.grad is not None])
    assert float(F.cosine_similarity(g16, g32, dim=0)) > 0.95


def test_scratch_pool_reuses_cpu_buffers():
    pool = kernels.ScratchPool(max_buffers=2)
    a = pool.take((3, 5), torch.float32, torch.device("cpu"))
    pool.give(a)
    assert pool.take((3, 5), torch.float32, torch.device("cpu")) is a  # reused once given back
    assert pool.take((3, 5), torch.float32, torch.device("cpu")) is not a
    for _ in range(4):
        pool.give(torch.empty(2, 2))
    assert len(pool._free) == 2


def test_saved_tensor_hooks_are_public():
    sae = build_sae({"arch": "relu", "d_in": 4, "width": 8, "k": 2})
    assert {"W_enc", "b_enc", "W_dec", "b_dec"} == set(sae.saved_tensors())
    assert not hasattr(sae, "_saved_tensors") and not hasattr(sae, "_load_saved_tensors")
    other = build_sae({"arch": "relu", "d_in": 4, "width": 8, "k": 2, "seed": 1})
    other.load_saved_tensors(sae.saved_tensors())
    assert all(torch.equal(a, b) for a, b in zip(sae.saved_tensors().values(), other.saved_tensors().values()))
