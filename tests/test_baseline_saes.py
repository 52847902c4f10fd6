"""Tests for the baseline SAEs (ReLU/L1, BatchTopK, JumpReLU, Gated): efficient paths vs naive
dense references (outputs, losses, every gradient), arch-specific mechanics (L1 weighting and
warm-up, batch selection and threshold, STE, detached auxiliary loss, decoder-norm hooks),
the docs/reference.md §2 saved format, config checks, and a small feature-recovery run per arch (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from synthetic import recovery, sample, train

from saepipe.saes import kernels, load_sae, registry, save_sae
from saepipe.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from saepipe.saes.gated import GatedConfig, GatedSAE
from saepipe.saes.jumprelu import JumpReLUConfig, JumpReLUSAE
from saepipe.saes.relu import ReLUConfig, ReLUSAE

ARCHS = {
    "relu": (ReLUSAE, ReLUConfig),
    "batchtopk": (BatchTopKSAE, BatchTopKConfig),
    "jumprelu": (JumpReLUSAE, JumpReLUConfig),
    "gated": (GatedSAE, GatedConfig),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def build(arch, d=16, M=64, k=4, **kw):
    sae_cls, cfg_cls = ARCHS[arch]
    return sae_cls(cfg_cls(arch=arch, d_in=d, width=M, k=k, **kw))


def make_sae(arch, d=16, M=64, k=4, B=128, **kw):
    """An SAE off its symmetric init (act_norm_factor 0.5 exercises the units) + a batch."""
    if arch == "batchtopk":
        kw.setdefault("auxk", False)
    sae = build(arch, d, M, k, act_norm_factor=0.5, **kw)
    x = torch.randn(B, d) * 2 + 1
    sae.init_from_batch(x)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if arch == "jumprelu":  # thresholds where the activations are, so the STE window is hit
            sae.threshold.copy_(torch.rand(M) * 0.3)
    return sae, x


def grads(sae, *extra):
    g = {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for name, p in sae.named_parameters()}
    g.update({f"input{i}": t.grad.clone() for i, t in enumerate(extra)})
    return g


# ---- naive references: dense [B, M] code, dense decode --------------------------------------
def naive_relu(sae, x, scale):
    cfg = sae.cfg
    x_n = x * cfg.act_norm_factor
    f = F.relu((x_n - sae.b_dec) @ sae.W_enc + sae.b_enc)
    x_hat = f @ sae.W_dec + sae.b_dec
    l1 = cfg.l1_coeff * scale / cfg.d_in * (f * sae.W_dec.norm(dim=1)).sum(1).mean()
    return f, x_hat / cfg.act_norm_factor, {"mse": (x_n - x_hat).pow(2).mean(), "l1": l1}


def naive_batchtopk(sae, x, training):
    cfg = sae.cfg
    x_n = x * cfg.act_norm_factor
    f = F.relu((x_n - sae.b_dec) @ sae.W_enc + sae.b_enc)
    if training:  # top k*B over the flattened batch
        sel = f.detach().flatten().topk(cfg.k * len(x)).indices
        mask = torch.zeros(f.numel()).scatter(0, sel, 1.0).view_as(f)
    else:
        mask = (f > sae.threshold).float()
    f = f * mask
    x_hat = f @ sae.W_dec + sae.b_dec
    return f, x_hat / cfg.act_norm_factor, {"mse": (x_n - x_hat).pow(2).mean()}


def naive_jumprelu(sae, x):
    """STE written with detach tricks: value r*H(r-t); d/dt = -(t/eps) K, d/dr = H."""
    cfg, eps, t = sae.cfg, sae.cfg.bandwidth, sae.threshold
    x_n = x * cfg.act_norm_factor
    r = F.relu((x_n - sae.b_dec) @ sae.W_enc + sae.b_enc)
    H = (r > t).float().detach()
    K = ((r - t).abs() < eps / 2).float().detach()
    zero_t = t - t.detach()  # value 0, gradient 1 w.r.t. t
    f = r * H - (t.detach() / eps) * K * zero_t
    x_hat = f @ sae.W_dec + sae.b_dec
    l0 = (H - K / eps * zero_t).sum(1).mean() * cfg.l0_coeff / cfg.d_in
    return f, x_hat / cfg.act_norm_factor, {"mse": (x_n - x_hat).pow(2).mean(), "l0_penalty": l0}


def naive_gated(sae, x):
    """Two separate encoders (W_gate = W, W_mag = exp(r_mag) W) as in the paper."""
    cfg = sae.cfg
    x_n = x * cfg.act_norm_factor
    x_c = x_n - sae.b_dec
    pi_gate = x_c @ sae.W_enc + sae.b_gate
    mag = x_c @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    f = (pi_gate > 0).float() * F.relu(mag)
    x_hat = f @ sae.W_dec + sae.b_dec
    x_aux = F.relu(pi_gate) @ sae.W_dec.detach() + sae.b_dec.detach()
    losses = {
        "mse": (x_n - x_hat).pow(2).mean(),
        "l1_gate": cfg.l1_coeff / cfg.d_in * F.relu(pi_gate).sum(1).mean(),
        "aux_gate": (x_n - x_aux).pow(2).mean(),
    }
    return f, x_hat / cfg.act_norm_factor, losses


def dense_code(acts_BK, idx_BK, M):
    return torch.zeros(len(acts_BK), M).scatter_add(1, idx_BK, acts_BK.detach())


CASES = [
    ("relu", {"l1_warmup_tokens": 1000}),
    ("batchtopk", {}),
    ("batchtopk", {"eval": True}),
    ("jumprelu", {"bandwidth": 0.05, "l0_coeff": 0.3}),
    ("gated", {"l1_coeff": 0.5}),
]


@pytest.mark.parametrize("decode", ["sparse", "dense"])
@pytest.mark.parametrize("arch,kw", CASES)
def test_efficient_matches_naive(arch, kw, decode, monkeypatch):
    # wide codes train fused and decode with a matmul, narrow ones train and decode sparsely
    # (embedding_bag, sparse encoder backward): both must be exact
    for name in ("DENSE_DECODE_MIN_FILL", "DENSE_TRAIN_MIN_FILL"):
        monkeypatch.setattr(kernels, name, 0.0 if decode == "dense" else float("inf"))
    torch.manual_seed(0)
    kw = dict(kw)
    eval_mode = kw.pop("eval", False)
    sae, x = make_sae(arch, **kw)
    if arch == "relu":
        sae.tokens_seen.fill_(500)  # half-way through the warm-up
    if eval_mode:
        sae.threshold.fill_(0.4)
        sae.eval()
    R = torch.randn_like(x)  # random upstream grad on x_hat as well as the losses
    x.requires_grad_(True)

    def backward(x_hat, losses):
        sae.zero_grad()
        x.grad = None
        (sum(losses.values()) + (x_hat * R).sum() * 1e-2).backward()
        return grads(sae, x)

    out = sae(x)
    g_eff = backward(out.x_hat_BD, out.losses)
    if arch == "relu":
        f_ref, x_hat_ref, losses_ref = naive_relu(sae, x, scale=0.5)
    elif arch == "batchtopk":
        f_ref, x_hat_ref, losses_ref = naive_batchtopk(sae, x, training=not eval_mode)
    else:
        naive = {"jumprelu": naive_jumprelu, "gated": naive_gated}[arch]
        f_ref, x_hat_ref, losses_ref = naive(sae, x)
    g_ref = backward(x_hat_ref, losses_ref)
    torch.testing.assert_close(out.x_hat_BD, x_hat_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.losses, losses_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_eff, g_ref, rtol=1e-4, atol=1e-5)  # every parameter + input
    # padded sparse code: exactly the dense code, width = max per-token L0, zero padding
    M = sae.cfg.width
    torch.testing.assert_close(dense_code(out.acts_BK, out.idx_BK, M), f_ref.detach())
    l0_B = (f_ref > 0).sum(1)
    assert torch.equal((out.acts_BK > 0).sum(1), l0_B)
    assert (out.acts_BK >= 0).all() and l0_B.min() < l0_B.max()
    if arch != "jumprelu":  # L = max L0, padding = (act 0, idx 0)
        assert out.acts_BK.shape[1] == max(1, int(l0_B.max()))
        assert (out.idx_BK[out.acts_BK == 0] == 0).all()
    sae.eval()  # decode(encode(x)) is the forward's x_hat (eval: no training-state updates)
    out_eval = sae(x)
    with torch.no_grad():
        enc = sae.encode(x)
    torch.testing.assert_close(sae.decode(enc), out_eval.x_hat_BD)
    assert enc.acts_BK.shape[1] == max(1, int(l0_B.max()))  # no-grad code: no extra entries
    if arch != "batchtopk":  # the variable-L0 archs carry the dense code when it is wide
        assert (enc.dense_BM is not None) == (decode == "dense")
    assert (enc.idx_BK[enc.acts_BK == 0] == 0).all()
    if arch == "jumprelu":  # the STE reaches the threshold
        assert g_eff["threshold"].abs().max() > 0


def test_relu_l1_weighting_warmup_and_no_renormalisation():
    cfg = ReLUConfig("relu", 16, 64, 4, l1_coeff=2.0, training_tokens=8000)
    assert cfg.warmup_tokens == 400  # 5% of training_tokens by default
    explicit = ReLUConfig("relu", 16, 64, 4, training_tokens=8000, l1_warmup_tokens=7)
    assert explicit.warmup_tokens == 7
    assert ReLUConfig("relu", 16, 64, 4).warmup_tokens == 0  # unknown length: no warm-up
    sae = ReLUSAE(cfg)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((64,), 0.1))  # dec_init_norm
    x = torch.randn(100, 16)
    sae.init_from_batch(x)
    with torch.no_grad():  # non-uniform decoder norms: the weighting must use them
        sae.W_dec.mul_(torch.rand(64, 1) * 3 + 0.2)
        sae.b_enc.add_(0.2)
    sae.eval()
    with torch.no_grad():
        out = sae(x)
    norms = sae.W_dec.detach().norm(dim=1)
    f = dense_code(out.acts_BK, out.idx_BK, 64)
    full = float(2.0 / 16 * (f * norms).sum(1).mean())
    assert float(out.losses["l1"]) == pytest.approx(full, rel=1e-6)  # eval: full lambda
    assert abs(out.losses["l1"] - 2.0 / 16 * f.sum(1).mean()) > 1e-3  # norms matter
    sae.train()
    ratios = [float(sae(x).losses["l1"].detach() / full) for _ in range(6)]  # 100 tokens per step
    assert ratios == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0], abs=1e-5)
    assert int(sae.tokens_seen) == 600
    # no unit-norm constraint: hooks leave weights and gradient alone
    sae.zero_grad()
    sum(sae(x).losses.values()).backward()
    W, g = sae.W_dec.detach().clone(), sae.W_dec.grad.clone()
    sae.before_optimizer_step()
    sae.after_optimizer_step()
    assert torch.equal(sae.W_dec, W) and torch.equal(sae.W_dec.grad, g)
    assert (sae.W_dec.norm(dim=1) - 1).abs().max() > 0.1


def test_batchtopk_batch_selection_and_threshold():
    torch.manual_seed(0)
    sae, x = make_sae("batchtopk", B=128, threshold_momentum=1.0)
    k, B = sae.cfg.k, len(x)
    out = sae(x)
    per_token = (out.acts_BK > 0).sum(1)
    assert int(per_token.sum()) == k * B  # exactly k*B activations in the batch
    assert per_token.min() < k < per_token.max()  # ... not k per token
    f = F.relu((x * 0.5 - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    kth = f.flatten().topk(k * B).values.min()
    torch.testing.assert_close(out.acts_BK[out.acts_BK > 0].min().detach(), kth)
    assert float(sae.threshold) == pytest.approx(float(kth))  # momentum 1: last batch's min
    # EMA: first update sets, later ones move by the momentum
    sae2, _ = make_sae("batchtopk", threshold_momentum=0.25)
    x1, x2 = x[:64], x[64:] * 1.5
    m = []
    for xb in (x1, x2):
        o = sae2(xb)
        m.append(float(o.acts_BK.detach()[o.acts_BK > 0].min()))
    assert float(sae2.threshold) == pytest.approx(m[0] + 0.25 * (m[1] - m[0]), rel=1e-5)
    # eval: the threshold decides, per token (no dependence on the rest of the batch)
    sae.eval()
    thr = float(sae.threshold)
    with torch.no_grad():
        ev = sae(x)
    assert float(sae.threshold) == thr  # no update in eval
    torch.testing.assert_close(dense_code(ev.acts_BK, ev.idx_BK, sae.cfg.width), f * (f > thr))
    one = sae.encode(x[:1])
    torch.testing.assert_close(dense_code(one.acts_BK, one.idx_BK, sae.cfg.width)[0], (f * (f > thr))[0])


def test_batchtopk_auxk_reaches_dead_latents():
    torch.manual_seed(0)
    sae, x = make_sae("batchtopk", auxk=True, k_aux=8, dead_tokens=10)
    dead = torch.arange(64) % 2 == 0
    sae.tokens_since_fired.copy_(dead.long() * 100)
    out = sae(x)
    assert out.losses["auxk"] > 0
    out.losses["auxk"].backward()
    rows = sae.W_dec.grad.abs().sum(1)
    assert rows[dead].max() > 0 and rows[~dead].max() == 0


def test_jumprelu_ste_and_l0_penalty():
    torch.manual_seed(0)
    sae, x = make_sae("jumprelu", bandwidth=0.05, l0_coeff=0.3)
    out = sae(x)
    d, B, eps = 16, len(x), 0.05
    l0_measured = (out.acts_BK > 0).sum(1).float().mean()
    torch.testing.assert_close(out.losses["l0_penalty"], 0.3 / d * l0_measured)
    out.losses["l0_penalty"].backward()  # the penalty trains only the thresholds (STE)
    r = F.relu((x * 0.5 - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    in_window = ((r - sae.threshold.detach()).abs() < eps / 2).float().sum(0)
    assert in_window.sum() > 0
    torch.testing.assert_close(sae.threshold.grad, -0.3 / (d * B * eps) * in_window)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        g = getattr(sae, name).grad
        assert g is None or g.abs().max() == 0, name
    # reconstruction gradient: -(t/eps) K(...) dL/df summed over tokens (naive test covers it)
    sae.zero_grad()
    sae(x).losses["mse"].backward()
    assert sae.threshold.grad.abs().max() > 0
    with torch.no_grad():
        sae.threshold[:5] = -0.1
    sae.after_optimizer_step()
    assert (sae.threshold >= 0).all() and sae.threshold[:5].abs().max() == 0


def test_gated_aux_term_is_detached_from_the_decoder():
    torch.manual_seed(0)
    sae, x = make_sae("gated", l1_coeff=0.5)
    out = sae(x)
    out.losses["aux_gate"].backward()
    assert sae.W_dec.grad is None or sae.W_dec.grad.abs().max() == 0
    for name in ("r_mag", "b_mag"):  # the magnitude path is not in the aux term
        assert getattr(sae, name).grad is None or getattr(sae, name).grad.abs().max() == 0
    assert sae.b_gate.grad.abs().max() > 0 and sae.W_enc.grad.abs().max() > 0
    # b_dec gets only the encoder-side gradient (x - b_dec); none through the aux decode
    g_bdec = sae.b_dec.grad.clone()
    sae.zero_grad()
    x_n = x * 0.5
    pi = (x_n - sae.b_dec) @ sae.W_enc + sae.b_gate
    ref = (x_n - F.relu(pi) @ sae.W_dec.detach() - sae.b_dec.detach()).pow(2).mean()
    ref.backward()
    torch.testing.assert_close(g_bdec, sae.b_dec.grad)
    sae.zero_grad()
    sae(x).losses["l1_gate"].backward()
    assert sae.W_dec.grad is None or sae.W_dec.grad.abs().max() == 0


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu", "gated"])
def test_unit_norm_decoder_hooks(arch):
    torch.manual_seed(0)
    sae, x = make_sae(arch)
    torch.testing.assert_close(build(arch).W_dec.norm(dim=1), torch.ones(64))  # init
    sae.W_dec.data.mul_(torch.rand(64, 1) * 3 + 0.1)
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    sum(sae(x).losses.values()).backward()
    g_before = sae.W_dec.grad.clone()
    sae.before_optimizer_step()
    g, u = sae.W_dec.grad, sae.W_dec.detach()
    assert (g * u).sum(1).abs().max() < 1e-6
    torch.testing.assert_close(g, g_before - (g_before * u).sum(1, keepdim=True) * u)


EXTRA_TENSORS = {
    "relu": {},
    "batchtopk": {"threshold": ()},
    "jumprelu": {"threshold": (64,)},
    "gated": {"b_gate": (64,), "r_mag": (64,), "b_mag": (64,)},
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_load_roundtrip(arch, tmp_path):
    assert registry.ARCHITECTURES[arch] == ARCHS[arch]
    torch.manual_seed(0)
    sae, x = make_sae(arch, hook="blocks.1.hook_resid_pre", model_id="tiny", seed=3)
    sae(x)  # a training forward: BatchTopK threshold, ReLU warm-up counter
    if arch == "gated":
        with torch.no_grad():
            sae.r_mag.normal_(0, 0.3)
    out_dir = save_sae(sae, tmp_path / "sae")
    tensors = load_file(str(out_dir / "sae.safetensors"))
    shapes = {"W_enc": (16, 64), "b_enc": (64,), "W_dec": (64, 16), "b_dec": (16,), **EXTRA_TENSORS[arch]}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    assert all(v.dtype == torch.float32 for v in tensors.values())
    if arch == "gated":
        assert tensors["b_enc"].abs().max() == 0  # the arch has no b_enc
    if arch == "batchtopk":
        assert float(tensors["threshold"]) == float(sae.threshold) > 0
    loaded = load_sae(out_dir)
    assert loaded.cfg == sae.cfg and type(loaded) is type(sae)
    sae.eval()
    a, b = sae(x), loaded(x)
    assert torch.equal(a.x_hat_BD, b.x_hat_BD) and torch.equal(a.idx_BK, b.idx_BK)
    assert torch.equal(a.acts_BK, b.acts_BK)
    assert all(torch.equal(a.losses[n], b.losses[n]) for n in a.losses)


BAD = {
    "relu": [
        ("l1_coeff", -1.0),
        ("l1_warmup_fraction", 1.5),
        ("l1_warmup_tokens", -3),
        ("dec_init_norm", 0.0),
        ("dead_tokens", -1),
    ],
    "batchtopk": [("threshold_momentum", 0.0), ("threshold_momentum", 2.0), ("k_aux", 0)],
    "jumprelu": [("l0_coeff", -0.1), ("bandwidth", 0.0), ("threshold_init", -1.0), ("enc_init_norm", 0.0)],
    "gated": [("l1_coeff", -1.0), ("enc_init_norm", -1.0), ("dead_tokens", -5)],
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_config_validation_and_flops(arch):
    cfg_cls = ARCHS[arch][1]
    assert cfg_cls.ARCH == arch
    for field, value in BAD[arch]:
        with pytest.raises(ValueError, match=field):
            cfg_cls(arch=arch, d_in=8, width=16, k=2, **{field: value})
    with pytest.raises(ValueError, match="arch"):
        cfg_cls(arch="topk", d_in=8, width=16, k=2)
    with pytest.raises(ValueError, match="k=20"):
        cfg_cls(arch=arch, d_in=8, width=16, k=20)
    cfg = cfg_cls(arch=arch, d_in=32, width=256, k=8)
    assert cfg_cls.from_dict(cfg.to_dict()) == cfg
    assert cfg.flops_per_token() == 2 * 32 * 256 + 2 * 32 * 8
    assert ARCHS[arch][0](cfg).flops_per_token() == cfg.flops_per_token()


# ---- learning: recover ground-truth sparse features -----------------------------------------


# 256 unit features in d=32, 3 active per sample, magnitudes U(1, 2); width 512, batch 512,
# 400 Adam steps at lr 1e-2 (~3 s each at 1 thread). Measured (data seeds 1000-1003 with SAE
# seeds 0-3; random init scores 0.47-0.52):
#   relu      l1_coeff 1.5   recovery 0.994-0.995   eval L0 6.8-7.4
#   batchtopk k 4, AuxK      recovery 0.884-0.893   eval L0 3.7-3.8
#   jumprelu  l0_coeff 0.5   recovery 0.836-0.851   eval L0 4.5-4.8
#   gated     l1_coeff 2.5   recovery 0.941-0.957   eval L0 4.1-4.4
# JumpReLU/BatchTopK/Gated are still improving at 400 steps (JumpReLU 0.89 at 800). BatchTopK,
# of the TopK family, must reach 0.9 like TopK: it trains 800 steps (measured 0.939-0.947 on
# data seeds 1000-1001; 0.96 at 1200). Thresholds leave margin for platform differences; the
# L0 bands apply to the L0-penalised archs.
LEARN = [
    ("relu", {"l1_coeff": 1.5, "training_tokens": 400 * 512}, 400, 0.97, None),
    ("batchtopk", {"dead_tokens": 50_000}, 800, 0.90, None),
    ("jumprelu", {"l0_coeff": 0.5}, 400, 0.80, (2.5, 8.0)),
    ("gated", {"l1_coeff": 2.5}, 400, 0.90, (2.0, 8.0)),
]


@pytest.mark.parametrize("arch,kw,steps,threshold,l0_band", LEARN)
def test_learns_ground_truth_features(arch, kw, steps, threshold, l0_band):
    gen = torch.Generator().manual_seed(1000)  # != the SAE seed (ReLU's normal_ init would
    feats_FD = F.normalize(torch.randn(256, 32, generator=gen), dim=1)  # draw the same numbers)
    sae = build(arch, d=32, M=512, k=4, **kw)
    assert recovery(sae.W_dec, feats_FD) < 0.6  # random init does not pass
    sae.init_from_batch(sample(gen, feats_FD, 512))
    train(sae, gen, feats_FD, steps, lr=1e-2)
    assert recovery(sae.W_dec, feats_FD) >= threshold
    if l0_band is not None:
        sae.eval()
        with torch.no_grad():
            l0 = float((sae(sample(gen, feats_FD, 2048)).acts_BK > 0).sum(1).float().mean())
        assert l0_band[0] <= l0 <= l0_band[1], l0
