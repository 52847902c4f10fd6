"""Fair-comparison settings of the routed SAEs (docs/reference.md §5): the balance weight alpha in the
papers' units, AuxK for Switch and Scale (value vs a dense reference, revival of dead latents
in training), and the cost accounting on the configs (parameters, training FLOPs)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from synthetic import sample, train
from test_saes import kill_every_third, naive_switch, starve_last_expert
from test_scale_sae import naive_scale

from saepipe.saes import ARCHITECTURES, build_sae, load_sae, save_sae
from saepipe.saes.base import ADAM_FLOPS_PER_PARAM, DECODER_FLOPS_PER_WEIGHT

pytestmark = pytest.mark.usefixtures("one_thread")

MOE = {"switch": {"arch": "switch", "n_experts": 4}, "scale": {"arch": "scale", "n_experts": 4, "active_experts": 2}}


def make_moe(arch, d=16, M=128, k=4, **kw):
    return build_sae({**MOE[arch], "d_in": d, "width": M, "k": k, **kw})


# ---- 1. alpha in the papers' units ----------------------------------------------------------
@pytest.mark.parametrize("units", ["paper", "normalised"])
@pytest.mark.parametrize("arch", ["switch", "scale"])
def test_balance_alpha_units(arch, units):
    """Training loss / f^2 = the papers' ||x - x_hat||^2 / d + alpha N sum f_i P_i on RAW data
    ("paper"), or the balance term is alpha N sum f_i P_i in the normalised loss ("normalised")."""
    torch.manual_seed(0)
    f, alpha, N, d = 0.3, 3.0, 4, 16
    sae = make_moe(arch, d=d, act_norm_factor=f, alpha=alpha, alpha_units=units)
    x_BD = torch.randn(512, d) * 4 + 1  # raw activations, ||x||^2 / d ~ 17
    sae.init_from_batch(x_BD)
    with torch.no_grad():
        sae.W_router.mul_(5.0)  # unbalanced routing (expert 0 preferred): L_lb well above 1
        sae.b_router.sub_(8 * sae.W_router[:, 0] / sae.W_router[:, 0].norm() ** 2)  # logit_0 + 8
    out = sae(x_BD)
    assert float(out.losses["auxk"]) == 0.0  # nothing dead: the sum is mse + balance
    # router recomputed by hand on the normalised input (Scale: + router_bias)
    logits_BN = (x_BD * f - sae.b_router) @ sae.W_router
    if arch == "scale":
        logits_BN = logits_BN + sae.router_bias
    probs_BN = logits_BN.softmax(1)
    top1_B = probs_BN.argmax(1)
    assert torch.equal(out.expert_B, top1_B)
    f_N = torch.bincount(top1_B, minlength=N).float() / len(x_BD)
    L_lb = N * (f_N * probs_BN.mean(0)).sum()
    assert L_lb > 1.2
    recon_raw = (x_BD - out.x_hat_BD).pow(2).sum(1).mean() / d
    total_over_f2 = sum(out.losses.values()) / f**2
    if units == "paper":
        torch.testing.assert_close(total_over_f2, recon_raw + alpha * L_lb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.losses["balance"], alpha * f**2 * L_lb)
    else:
        torch.testing.assert_close(out.losses["balance"], alpha * L_lb)
        torch.testing.assert_close(total_over_f2, recon_raw + alpha / f**2 * L_lb, rtol=1e-5, atol=1e-5)


def test_alpha_units_default_validation_and_old_configs(tmp_path):
    for arch in MOE:
        sae = make_moe(arch)
        assert sae.cfg.alpha_units == "paper" and sae.cfg.auxk and sae.cfg.auxk_expert_weight
        assert sae.cfg.k_aux is None and sae.cfg.k_aux_effective == 8 and sae.cfg.aux_coeff == 1 / 32
        with pytest.raises(ValueError, match="alpha_units.*'paper'"):
            make_moe(arch, alpha_units="raw")
        with pytest.raises(ValueError, match="auxk_expert_weight"):
            make_moe(arch, auxk_expert_weight="yes")
        # a config.json written before these fields existed still loads, with the defaults
        out_dir = save_sae(sae, tmp_path / arch)
        cfg = json.loads((out_dir / "config.json").read_text())
        assert cfg["alpha_units"] == "paper"  # the convention is recorded with every SAE
        for key in ("alpha_units", "auxk", "auxk_expert_weight", "k_aux", "aux_coeff", "weight_order"):
            cfg.pop(key, None)
        (out_dir / "config.json").write_text(json.dumps(cfg))
        assert load_sae(out_dir).cfg == sae.cfg


# ---- 2. AuxK for Switch and Scale -----------------------------------------------------------
@pytest.mark.parametrize("arch", ["switch", "scale"])
def test_auxk_matches_dense_reference_and_reaches_only_dead_latents(arch):
    """AuxK = the dense reference (all M pre-activations, masked to the dead ones), including
    dead latents of an expert no token is routed to (AuxK ignores routing)."""
    torch.manual_seed(0)
    sae = make_moe(arch, act_norm_factor=0.5, k_aux=6, dead_tokens=1000)
    x_BD = torch.randn(256, 16) * 2 + 1
    sae.init_from_batch(x_BD)
    assert float(sae(x_BD).losses["auxk"]) == 0.0  # nothing dead yet -> zero term
    sae.tokens_since_fired.zero_()
    with torch.no_grad():
        if arch == "scale":
            sae.router_bias[-1] = -60.0  # the last expert gets no token at all
            sae.omega.fill_(0.4)
    if arch == "switch":
        starve_last_expert(sae, x_BD)  # the last expert gets no token at all
    kill_every_third(sae)
    dead_M = sae.dead_mask().clone()
    naive = naive_switch if arch == "switch" else naive_scale
    ref = naive(sae, x_BD)[1]["auxk"]  # before the forward updates the dead statistics
    sae.zero_grad()
    ref.backward()
    g_ref = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    out = sae(x_BD)
    n = sae.cfg.expert_width
    assert not (out.idx_BK // n == 3).any()  # expert 3 unrouted
    out.losses["auxk"].backward()
    torch.testing.assert_close(out.losses["auxk"], ref)
    g_eff = {n_: p.grad for n_, p in sae.named_parameters() if p.grad is not None}
    assert g_eff.keys() == g_ref.keys()
    torch.testing.assert_close(g_eff, g_ref, rtol=1e-4, atol=1e-6)
    rows_M = g_eff["W_dec"].abs().sum(1)
    assert rows_M[~dead_M].max() == 0 and rows_M[dead_M].max() > 0  # only dead latents decode
    assert rows_M[3 * n :][dead_M[3 * n :]].max() > 0  # ... also in the unrouted expert
    assert "W_router" not in g_eff or g_eff["W_router"].abs().max() == 0  # weights detached
    sae.eval()
    assert "auxk" not in sae(x_BD).losses


def _train_with_dead_half(arch: str, auxk: bool, expert_weight: bool = True, steps: int = 300) -> float:
    """d=32, M=256, N=4 on synthetic sparse data with the odd latents poisoned dead (Switch:
    encoder columns x 0.01, so they never reach the expert's TopK; Scale: b_enc = -1);
    returns the final dead fraction (dead = no firing for 2048 tokens = 4 batches)."""
    gen = torch.Generator().manual_seed(1)
    feats_FD = F.normalize(torch.randn(256, 32, generator=gen), dim=1)
    sae = build_sae(
        {
            **MOE[arch],
            "d_in": 32,
            "width": 256,
            "k": 4,
            "auxk": auxk,
            "auxk_expert_weight": expert_weight,
            "dead_tokens": 2048,
        }
    )
    sae.init_from_batch(sample(gen, feats_FD, 512))
    with torch.no_grad():
        if arch == "switch":
            sae.W_enc[:, :, 1::2] *= 0.01
        else:
            sae.b_enc[1::2] = -1.0
    train(sae, gen, feats_FD, steps, lr=3e-3)
    return sae.dead_fraction()


@pytest.mark.parametrize("arch", ["switch", "scale"])
def test_auxk_revives_dead_latents_in_training(arch):
    # measured (seed 1): without AuxK 0.50 stay dead for both archs; with AuxK 0.00 (Switch)
    # and 0.00 (Scale); unweighted AuxK (auxk_expert_weight=False) 0.50 / 0.50: the dead
    # latents learn pre-activations ~1/w too small to win the routed TopK.
    without = _train_with_dead_half(arch, auxk=False)
    with_auxk = _train_with_dead_half(arch, auxk=True)
    assert without > 0.45
    assert with_auxk < 0.1


def test_unweighted_auxk_does_not_revive_switch():
    """Why ``auxk_expert_weight`` defaults to True (gate p ~ 1/N in the main path)."""
    assert _train_with_dead_half("switch", auxk=True, expert_weight=False) > 0.4


# ---- 6. costs on the configs ----------------------------------------------------------------
def _all_configs():
    base = {"d_in": 12, "width": 48, "k": 3}
    yield {"arch": "topk", **base}
    yield {"arch": "topk", **base, "auxk": False}
    yield {"arch": "batchtopk", **base}
    yield {"arch": "relu", **base}
    yield {"arch": "jumprelu", **base}
    yield {"arch": "gated", **base}
    yield {"arch": "matryoshka", **base, "width": 48, "matryoshka_widths": [12, 24, 48]}
    for heaviside in (False, True):
        yield {"arch": "switch", **base, "n_experts": 4, "heaviside": heaviside}
    for lowpass in ("mean", "identity", "learned"):
        for fs in (True, False):
            for norm in ("rows", "columns"):
                yield {
                    "arch": "scale",
                    **base,
                    "n_experts": 4,
                    "active_experts": 2,
                    "lowpass": lowpass,
                    "feature_scaling": fs,
                    "decoder_norm": norm,
                }


def test_n_params_matches_built_sae():
    seen = set()
    for cfg in _all_configs():
        sae = build_sae(cfg)
        seen.add(cfg["arch"])
        assert sae.cfg.n_params() == sum(p.numel() for p in sae.parameters()), cfg
    assert seen == set(ARCHITECTURES)  # a new arch must be added here (and override n_params)


def test_train_flops_per_token_by_hand():
    assert (ADAM_FLOPS_PER_PARAM, DECODER_FLOPS_PER_WEIGHT) == (12, 6)
    d, M, k, B = 32, 256, 8, 1024
    topk = build_sae({"arch": "topk", "d_in": d, "width": M, "k": k}).cfg
    fwd = 2 * 32 * 256 + 2 * 32 * 8  # 16896
    params = 2 * 32 * 256 + 256 + 32  # 16672
    assert topk.n_params() == params
    assert topk.train_flops_per_token(B) == 3 * fwd + (12 * params + 6 * 256 * 32) / B
    assert topk.train_flops_per_token(B) == 50688 + 249216 / 1024 == 50931.375
    switch = build_sae({"arch": "switch", "d_in": d, "width": M, "k": k, "n_experts": 4}).cfg
    fwd = 2 * 32 * 4 + 2 * 32 * 64 + 2 * 32 * 8  # router + one expert + decoder = 4864
    params = 2 * 32 * 256 + 32 * 4 + 2 * 32  # W_enc, W_dec, W_router, b_router, b_dec = 16576
    assert switch.n_params() == params
    assert switch.train_flops_per_token(B) == 3 * 4864 + (12 * 16576 + 6 * 256 * 32) / 1024
    # FLOP-matched Switch (expert width = dense width): ~equal forward, 4x the parameters, so
    # the optimizer dominates at batch 1 and vanishes at large batches
    matched = build_sae({"arch": "switch", "d_in": d, "width": 4 * M, "k": k, "n_experts": 4}).cfg
    assert abs(matched.flops_per_token() / topk.flops_per_token() - 1) < 0.02
    assert matched.train_flops_per_token(1) > 3 * topk.train_flops_per_token(1)
    assert matched.train_flops_per_token(65536) < 1.03 * topk.train_flops_per_token(65536)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            topk.train_flops_per_token(bad)
