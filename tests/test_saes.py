"""Tests for saepipe.saes: efficient paths vs naive dense references, losses, decoder-norm
hooks, saved format, FLOPs, AuxK, config errors, and a small feature-recovery run (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from synthetic import recovery, sample, train

from saepipe.saes import (
    ARCHITECTURES,
    SAE,
    Encoding,
    SAEOutput,
    SwitchConfig,
    TopKConfig,
    build_sae,
    config_from_dict,
    kernels,
    load_sae,
    save_sae,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- naive references (dense [B, M] encode + mask, dense decode) ---------------------------
def naive_auxk(sae, x_n, x_hat_n, pre_BM, weight_BM=None):
    """Gao's AuxK densely: all M pre-activations ``pre_BM`` computed, the top-k_aux of the DEAD
    latents kept, the detached residual reconstructed WITHOUT b_dec (each latent's ReLU times
    ``weight_BM``, the MoE expert weight, detached), FVU-normalised, times aux_coeff. ``{}``
    outside training or with auxk off; 0 when nothing is dead. Call it BEFORE the efficient
    forward, which updates the dead statistics."""
    cfg = sae.cfg
    if not (sae.training and cfg.auxk):
        return {}
    dead_M = sae.dead_mask()
    if not dead_M.any():
        return {"auxk": torch.zeros(())}
    k_aux = min(cfg.k_aux if cfg.k_aux is not None else cfg.d_in // 2, int(dead_M.sum()))
    sel = pre_BM.masked_fill(~dead_M, float("-inf")).topk(k_aux, dim=1).indices
    z_BM = F.relu(pre_BM) * torch.zeros_like(pre_BM).scatter(1, sel, 1.0)
    if weight_BM is not None:
        z_BM = z_BM * weight_BM.detach()
    e_BD = (x_n - x_hat_n).detach()
    fvu = (e_BD - z_BM @ sae.W_dec).pow(2).sum() / (e_BD - e_BD.mean(0)).pow(2).sum()
    return {"auxk": cfg.aux_coeff * fvu}


def naive_topk(sae, x_BD):
    cfg = sae.cfg
    x_n = x_BD * cfg.act_norm_factor
    pre_BM = (x_n - sae.b_dec) @ sae.W_enc + sae.b_enc
    z_BM = F.relu(pre_BM)
    mask_BM = torch.zeros_like(z_BM).scatter(1, z_BM.topk(cfg.k, dim=1).indices, 1.0)
    x_hat_n = (z_BM * mask_BM) @ sae.W_dec + sae.b_dec
    losses = {"mse": (x_n - x_hat_n).pow(2).mean(), **naive_auxk(sae, x_n, x_hat_n, pre_BM)}
    return x_hat_n / cfg.act_norm_factor, losses


def naive_balance_coeff(cfg):
    """alpha in the normalised loss: the papers' alpha (raw units) times act_norm_factor^2."""
    return cfg.alpha * cfg.act_norm_factor**2 if cfg.alpha_units == "paper" else cfg.alpha


def naive_switch(sae, x_BD):
    cfg = sae.cfg
    N, n, M = cfg.n_experts, cfg.width // cfg.n_experts, cfg.width
    x_n = x_BD * cfg.act_norm_factor
    probs_BN = torch.softmax((x_n - sae.b_router) @ sae.W_router, dim=1)
    expert_B = probs_BN.argmax(1)
    W_enc_DM = sae.W_enc.permute(1, 0, 2).reshape(cfg.d_in, M)  # expert i: cols [i n, (i+1) n)
    pre_BM = (x_n - sae.b_dec) @ W_enc_DM
    own_BM = (torch.arange(M) // n)[None, :] == expert_B[:, None]
    sel = pre_BM.masked_fill(~own_BM, float("-inf")).topk(cfg.k, dim=1).indices
    mask_BM = torch.zeros_like(pre_BM).scatter(1, sel, 1.0)
    z_BM = F.relu(pre_BM) * mask_BM
    gate_B = torch.ones(len(x_BD)) if cfg.heaviside else probs_BN.gather(1, expert_B[:, None])[:, 0]
    x_hat_n = sae.b_dec + gate_B[:, None] * (z_BM @ sae.W_dec)
    f_N = torch.bincount(expert_B, minlength=N).float() / len(x_BD)
    balance = naive_balance_coeff(cfg) * N * (f_N * probs_BN.mean(0)).sum()
    # AuxK over the whole dictionary; latent j decoded with its own expert's gate p_{i(j)}
    aux_w_BM = probs_BN[:, torch.arange(M) // n] if cfg.auxk_expert_weight else None
    losses = {
        "mse": (x_n - x_hat_n).pow(2).mean(),
        "balance": balance,
        **naive_auxk(sae, x_n, x_hat_n, pre_BM, None if cfg.heaviside else aux_w_BM),
    }
    return x_hat_n / cfg.act_norm_factor, losses


def kill_every_third(sae):
    """Mark latents 0, 3, 6, ... dead (AuxK then has work to do)."""
    with torch.no_grad():
        sae.tokens_since_fired[::3] = sae.dead_threshold() + 1


def make_sae(arch, d=32, M=256, k=8, N=4, **kw):
    extra = {"n_experts": N} if arch == "switch" else {"auxk": False}
    sae = build_sae({"arch": arch, "d_in": d, "width": M, "k": k, "act_norm_factor": 0.5, **extra, **kw})
    x = torch.randn(512, d) * 2 + 1
    sae.init_from_batch(x)
    with torch.no_grad():  # move off the symmetric init
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return sae, x


def starve_last_expert(sae, x_BD):
    """Make expert N-1 never win: its logit = logit_0 + 10 (x_n - b_router)[0] < logit_0 - 10."""
    with torch.no_grad():
        sae.W_router[0, :] = 0.0  # dim 0 only matters for the last expert
        sae.W_router[:, -1] = sae.W_router[:, 0]
        sae.W_router[0, -1] = 10.0
        sae.b_router[0] = (x_BD[:, 0] * sae.cfg.act_norm_factor).max() + 1.0


def grads(sae, *extra):
    g = {name: p.grad.clone() for name, p in sae.named_parameters()}
    g.update({f"input{i}": t.grad.clone() for i, t in enumerate(extra)})
    return g


CASES = [
    ("topk", {}),
    ("topk", {"auxk": True, "dead": True}),
    ("switch", {}),
    ("switch", {"heaviside": True, "alpha_units": "normalised", "dead": True}),
    ("switch", {"dead": True}),
    ("switch", {"dead": True, "k_aux": 1000}),  # k_aux > n_dead
    ("switch", {"dead": True, "auxk_expert_weight": False}),
    ("switch", {"d": 6, "M": 12, "k": 2, "N": 3, "dead": True}),
]  # unaligned -> loop fallback


@pytest.mark.parametrize("arch,kw", CASES)
def test_efficient_matches_naive(arch, kw):
    torch.manual_seed(0)
    kw = dict(kw)
    dead = kw.pop("dead", False)
    sae, x = make_sae(arch, **kw)
    if arch == "switch":
        starve_last_expert(sae, x)
    if dead:
        kill_every_third(sae)
    naive = naive_topk if arch == "topk" else naive_switch
    R = torch.randn_like(x)  # random upstream grad on x_hat as well as the losses
    x.requires_grad_(True)  # the input gradient must match too

    def backward(x_hat, losses):
        sae.zero_grad()
        x.grad = None
        (sum(losses.values()) + (x_hat * R).sum() * 1e-2).backward()
        return grads(sae, x)

    x_hat_ref, losses_ref = naive(sae, x)  # before the forward updates the dead statistics
    g_ref = backward(x_hat_ref, losses_ref)
    out = sae(x)
    assert isinstance(out, SAEOutput) and out.acts_BK.shape == (len(x), sae.cfg.k)
    assert ("auxk" in out.losses) == sae.cfg.auxk
    if dead:
        assert out.losses["auxk"] > 0
    if arch == "switch":
        counts = torch.bincount(out.expert_B, minlength=sae.cfg.n_experts)
        assert counts[-1] == 0 and (counts > 0).sum() >= 2, counts
        assert torch.equal(
            out.idx_BK // (sae.cfg.width // sae.cfg.n_experts), out.expert_B[:, None].expand_as(out.idx_BK)
        )
    g_eff = backward(out.x_hat_BD, out.losses)
    torch.testing.assert_close(out.x_hat_BD, x_hat_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.losses, losses_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_eff, g_ref, rtol=1e-4, atol=1e-5)  # every parameter + input
    enc = sae.encode(x)
    assert isinstance(enc, Encoding) and (enc.acts_BK >= 0).all()
    torch.testing.assert_close(sae.decode(enc), out.x_hat_BD)


@pytest.mark.filterwarnings("error")  # the native kernel must not silently fall back
def test_grouped_mm_native_vs_fallback_with_empty_expert():
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 7, 4])
    x = torch.randn(16, 8, requires_grad=True)
    W = torch.randn(4, 8, 12, requires_grad=True)
    res = []
    for fallback in (False, True):
        y = kernels.grouped_mm(x, W, counts, force_fallback=fallback)
        y.sum().backward()  # zero-stride upstream grad must work
        res.append((y.detach(), x.grad.clone(), W.grad.clone()))
        x.grad = W.grad = None
    torch.testing.assert_close(res[0], res[1])
    assert res[0][2][1].abs().max() == 0  # empty expert gets zero grad


@pytest.mark.parametrize("heaviside", [False, True])
def test_switch_balance_and_router_grad(heaviside):
    N, alpha = 4, 3.0
    sae = build_sae(SwitchConfig("switch", 16, 64, 4, n_experts=N, alpha=alpha, heaviside=heaviside))
    x = torch.randn(256, 16).abs() + 1
    sae.W_router.data.zero_()  # uniform probabilities
    assert abs(sae(x).losses["balance"].item() - alpha * 1) < 1e-5
    sae.W_router.data[:, 0] = 100.0  # total collapse onto expert 0
    out = sae(x)
    assert (out.expert_B == 0).all()
    assert abs(out.losses["balance"].item() - alpha * N) < 1e-4
    sae.W_router.data.normal_()
    sae(x).losses["mse"].backward()  # router gradient only via the gate p_{i*}
    g = sae.W_router.grad
    if heaviside:
        assert g is None or g.abs().max() == 0
    else:
        assert g.abs().max() > 0 and sae.b_router.grad.abs().max() > 0


@pytest.mark.parametrize("arch", ["topk", "switch"])
def test_decoder_norm_hooks(arch):
    sae, x = make_sae(arch)
    sae.W_dec.data.mul_(torch.rand(sae.cfg.width, 1) * 3 + 0.1)
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.width))
    sum(sae(x).losses.values()).backward()
    g_before = sae.W_dec.grad.clone()
    sae.before_optimizer_step()
    g, u = sae.W_dec.grad, sae.W_dec.detach()
    assert (g * u).sum(1).abs().max() < 1e-6  # only the parallel component was removed:
    torch.testing.assert_close(g, g_before - (g_before * u).sum(1, keepdim=True) * u)


@pytest.mark.parametrize("arch", ["topk", "switch"])
def test_save_load_roundtrip(arch, tmp_path):
    sae, x = make_sae(arch, hook="blocks.1.hook_resid_pre", model_id="tiny", seed=3)
    out_dir = save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "sae.safetensors"]
    d, M, N = sae.cfg.d_in, sae.cfg.width, getattr(sae.cfg, "n_experts", 1)
    shapes = {"W_enc": (d, M), "b_enc": (M,), "W_dec": (M, d), "b_dec": (d,)}
    if arch == "switch":
        shapes.update(W_router=(d, N), b_router=(d,), router_bias=(N,))
    tensors = load_file(str(out_dir / "sae.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    assert all(v.dtype == torch.float32 for v in tensors.values())
    text = (out_dir / "config.json").read_text()
    cfg = json.loads(text)
    assert text == json.dumps(cfg, sort_keys=True, indent=2) + "\n"
    assert {
        "arch",
        "d_in",
        "width",
        "k",
        "n_experts",
        "active_experts",
        "hook",
        "model_id",
        "act_norm_factor",
        "training_tokens",
        "seed",
    } <= set(cfg)
    assert cfg["n_experts"] == N and cfg["act_norm_factor"] == 0.5
    loaded = load_sae(out_dir)
    assert loaded.cfg == sae.cfg and type(loaded) is type(sae)
    sae.eval()
    a, b = sae(x), loaded(x)
    assert torch.equal(a.x_hat_BD, b.x_hat_BD) and torch.equal(a.idx_BK, b.idx_BK)
    assert all(torch.equal(a.losses[n], b.losses[n]) for n in a.losses)


def test_auxk_revives_dead_latents_and_dead_stats():
    sae = build_sae(TopKConfig("topk", 16, 64, 4, k_aux=8, dead_tokens=10))
    x = torch.randn(128, 16)
    sae.init_from_batch(x)
    assert sae(x).losses["auxk"] == 0  # nothing dead yet -> zero term
    dead = torch.arange(64) % 2 == 0
    sae.tokens_since_fired.copy_(dead.long() * 100)
    assert sae.dead_fraction() == 0.5
    sae.zero_grad()
    out = sae(x)
    assert out.losses["auxk"] > 0
    out.losses["auxk"].backward()
    g_eff = grads(sae)
    # naive Gao AuxK: top-k_aux dead pre-activations, residual WITHOUT b_dec, FVU-normalised
    sae.zero_grad()
    pre_BM = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    sel = pre_BM.masked_fill(~dead, float("-inf")).topk(8, dim=1).indices
    z_BM = F.relu(pre_BM) * torch.zeros_like(pre_BM).scatter(1, sel, 1.0)
    e_BD = (x - naive_topk(sae, x)[0]).detach()
    ref = (e_BD - z_BM @ sae.W_dec).pow(2).sum() / (e_BD - e_BD.mean(0)).pow(2).sum() / 32
    ref.backward()
    torch.testing.assert_close(out.losses["auxk"], ref)
    torch.testing.assert_close(g_eff, grads(sae), rtol=1e-4, atol=1e-6)
    rows = g_eff["W_dec"].abs().sum(1)
    assert rows[dead].max() > 0 and rows[~dead].max() == 0
    assert g_eff["W_enc"].abs().sum(0)[dead].max() > 0
    fired = torch.zeros(64, dtype=torch.bool)
    fired[out.idx_BK[out.acts_BK > 0]] = True
    assert (sae.tokens_since_fired[fired] == 0).all()
    assert (sae.tokens_since_fired[~fired & ~dead] == 128).all()
    sae.eval()
    assert "auxk" not in sae(x).losses


def test_config_errors_registry_and_flops():
    good = {"arch": "topk", "d_in": 8, "width": 16, "k": 2}
    assert isinstance(config_from_dict(good), TopKConfig)
    with pytest.raises(ValueError, match="bogus_key"):
        config_from_dict({**good, "bogus_key": 1})
    with pytest.raises(ValueError, match="switch"):
        config_from_dict({**good, "arch": "nope"})
    with pytest.raises(ValueError, match="divisible"):
        SwitchConfig("switch", 8, 18, 2, n_experts=4)
    with pytest.raises(ValueError, match="latents per expert"):
        SwitchConfig("switch", 8, 16, 5, n_experts=4)
    cfg = SwitchConfig("switch", 8, 16, 2, n_experts=4)
    assert config_from_dict(cfg.to_dict()) == cfg
    for name, (sae_cls, cfg_cls) in ARCHITECTURES.items():
        assert issubclass(sae_cls, SAE) and cfg_cls.ARCH == name
    t = build_sae(TopKConfig("topk", 32, 256, 8))  # FLOPs per token, docs/reference.md §1
    assert t.flops_per_token() == 2 * 32 * 256 + 2 * 32 * 8
    s = build_sae(SwitchConfig("switch", 32, 256, 8, n_experts=4))
    assert s.flops_per_token() == 2 * 32 * 4 + 2 * 32 * 64 + 2 * 32 * 8


def test_geometric_median():
    assert abs(float(kernels.geometric_median(torch.tensor([[0.0], [1.0], [10.0]]))) - 1) < 1e-3
    cloud_outliers = torch.cat([torch.randn(200, 4) * 0.1 + 2.0, torch.full((20, 4), 1000.0)])
    assert (kernels.geometric_median(cloud_outliers) - 2.0).abs().max() < 0.1


# ---- learning: recover ground-truth sparse features -----------------------------------------


# measured (data+init seeds 0-4, 1 thread): topk 0.985-0.994 in ~4.5 s, switch 0.958-0.965 in
# ~3 s; random init scores 0.51-0.55. Thresholds leave margin for platform differences.
@pytest.mark.parametrize(
    "cfg,steps,threshold",
    [
        ({"arch": "topk", "width": 512, "dead_tokens": 50_000}, 800, 0.95),
        ({"arch": "switch", "width": 1024, "n_experts": 4}, 800, 0.92),
    ],
)
def test_learns_ground_truth_features(cfg, steps, threshold):
    gen = torch.Generator().manual_seed(0)
    feats_FD = F.normalize(torch.randn(256, 32, generator=gen), dim=1)
    sae = build_sae({"d_in": 32, "k": 4, **cfg})
    assert recovery(sae.W_dec, feats_FD) < 0.8  # random init does not pass
    sae.init_from_batch(sample(gen, feats_FD, 512))
    train(sae, gen, feats_FD, steps, lr=3e-3)
    assert recovery(sae.W_dec, feats_FD) >= threshold


def _train_with_dead_half(auxk: bool, steps: int = 300) -> float:
    """TopK whose odd latents start dead (encoder bias pushed down); returns the final dead fraction."""
    gen = torch.Generator().manual_seed(1)
    feats_FD = F.normalize(torch.randn(256, 32, generator=gen), dim=1)
    sae = build_sae(
        {"arch": "topk", "d_in": 32, "width": 256, "k": 4, "auxk": auxk, "dead_tokens": 2048, "aux_coeff": 1 / 32}
    )
    sae.init_from_batch(sample(gen, feats_FD, 512))
    with torch.no_grad():
        sae.b_enc[1::2] = -1.0
    train(sae, gen, feats_FD, steps, lr=3e-3)
    return sae.dead_fraction()


def test_auxk_revives_dead_latents_in_training():
    # measured (seed 1): without AuxK 0.50 of the latents stay dead, with AuxK 0.07
    without, with_auxk = _train_with_dead_half(False), _train_with_dead_half(True)
    assert without > 0.3
    assert with_auxk < without / 3
