"""The SAEBench-style metrics with known answers: KL divergence of the next-token distribution
(SAE and zero-ablation splices, kl_div_score), cosine, l2 ratio and relative reconstruction
bias; and their columns in the aggregated table and on the metrics page."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_evaluate import (
    BOS_SPIKE,
    BOS_THRESHOLD,
    EVAL_CFG,
    HOOK,
    D,
    _evaluate_on,
    _perfect_sae,
    _tiny_model,
    _tokens,
    _write_eval_shard,
)

from saepipe.aggregate import aggregate
from saepipe.data.shards import read_shard
from saepipe.evaluate.metrics import (
    LATENT_STATS,
    SCHEMA_VERSION,
    EvalConfig,
    LatentCounts,
    evaluate_sae,
    lm_baseline,
    read_latent_stats,
    reconstruction_stats,
)
from saepipe.lm import capture, ce_loss, model_id, next_token_ce_kl, splice_ce_kl
from saepipe.plots.metrics_table import metrics_table
from saepipe.saes import build_sae, save_sae


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread on this busy machine."""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model with a BOS-like spike at position 0; its eval activations written with
    `exclude_positions: [0]` and without; the lm_baseline of each."""
    root = tmp_path_factory.mktemp("extra")
    model, model_dir = _tiny_model(root, bos_spike=BOS_SPIKE)
    tokens = _tokens()
    acts_BSD = capture(model, tokens, HOOK)
    assert (acts_BSD[:, 0, 0] > BOS_THRESHOLD).all() and (acts_BSD[:, 1:, 0] < BOS_THRESHOLD).all()
    acts = acts_BSD.reshape(-1, D).numpy().astype(np.float16)
    shards, baselines = {}, {}
    for name, excl in (("excl", [0]), ("none", None)):
        shards[name] = _write_eval_shard(root / f"{name}.zarr", model_dir, acts, tokens, excl)
        baselines[name] = root / f"baseline-{name}.json"
        lm_baseline(EVAL_CFG, str(model_dir), [shards[name]], str(baselines[name]))
    return {"root": root, "model": model, "model_dir": model_dir, "tokens": tokens, "shards": shards,
            "baselines": baselines}  # fmt: skip


def _evaluate(env, sae, name, shard="excl"):
    return _evaluate_on(env["root"], env["model_dir"], env["shards"][shard], env["baselines"][shard], sae, name)


def _scaled_sae(scale: float):
    """x_hat = scale * x exactly (the perfect SAE with its decoder scaled)."""
    sae = _perfect_sae()
    with torch.no_grad():
        sae.W_dec.mul_(scale)
    return sae


def _zero_sae():
    sae = build_sae({"arch": "topk", "d_in": D, "width": 2 * D, "k": 2, "auxk": False})
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae


def _kl_by_hand(clean_BSV: torch.Tensor, new_BSV: torch.Tensor) -> float:
    """Mean over positions 0..S-2 of sum_v p log(p / q), in float64 from explicit softmaxes."""
    p = torch.softmax(clean_BSV[:, :-1].double(), -1)
    q = torch.softmax(new_BSV[:, :-1].double(), -1)
    return float((p * (p.log() - q.log())).sum(-1).mean())


def _by_hand(clean_BSV: torch.Tensor, new_BSV: torch.Tensor, tokens_BS: torch.Tensor) -> tuple[float, float, float]:
    """(CE clean, CE, KL): mean -log softmax at the next token over positions 0..S-2, and the KL."""

    def ce(logits_BSV):
        logp = torch.log_softmax(logits_BSV[:, :-1].double(), -1)
        return float(-logp.gather(-1, tokens_BS[:, 1:, None]).mean())

    return ce(clean_BSV), ce(new_BSV), _kl_by_hand(clean_BSV, new_BSV)


# ---- the KL itself ------------------------------------------------------------------------------


def test_next_token_ce_kl_on_known_distributions():
    # p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3) at each scored position
    clean = torch.zeros(2, 3, 2)
    new = torch.tensor([math.log(3.0), 0.0]).expand(2, 3, 2).clone()
    new[:, -1] = torch.tensor([50.0, -50.0])  # the last position predicts nothing: ignored
    tokens = torch.tensor([[9, 0, 1], [9, 1, 1]])  # targets: 0, 1 | 1, 1 (position 0's token is no target)
    ce_clean, ce_new, kl = next_token_ce_kl(clean, new, tokens % 2)
    assert kl == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert ce_clean == pytest.approx(math.log(2), rel=1e-6)
    assert ce_new == pytest.approx((-math.log(3 / 4) - 3 * math.log(1 / 4)) / 4, rel=1e-6)
    assert next_token_ce_kl(new, new, tokens % 2)[2] == 0.0  # exactly
    # by hand on random logits, whatever the chunking; float16 logits are computed in float32
    logits = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(0))
    other = logits + torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(2))
    expected = _by_hand(logits, other, tokens)
    assert next_token_ce_kl(logits, other, tokens) == pytest.approx(expected, rel=1e-5)
    assert next_token_ce_kl(logits, other, tokens, chunk_elems=40) == pytest.approx(expected, rel=1e-5)
    assert next_token_ce_kl(logits.half(), other.half(), tokens) == pytest.approx(
        _by_hand(logits.half().float(), other.half().float(), tokens), rel=1e-4
    )
    with pytest.raises(ValueError, match="of one shape"):
        next_token_ce_kl(logits, other[:, :-1], tokens)


def test_splice_ce_kl_by_hand_on_the_tiny_model(env):
    model, tokens = env["model"], env["tokens"][:8]

    def noisy(act):  # a deterministic perturbation of every position
        return act * 0.7 + 0.3 * torch.roll(act, 1, dims=-1)

    clean_ce, spliced_ce, kl = splice_ce_kl(model, tokens, HOOK, noisy)
    with torch.no_grad():
        clean_BSV = model(tokens)
        spliced_BSV = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: noisy(act))])
    assert kl == pytest.approx(_kl_by_hand(clean_BSV, spliced_BSV), rel=1e-4)
    assert kl > 1e-4
    # the CEs are exactly ce_loss's numbers
    assert clean_ce == pytest.approx(ce_loss(model, tokens), abs=1e-6)
    assert spliced_ce == pytest.approx(ce_loss(model, tokens, HOOK, noisy), abs=1e-6)
    # kept positions take the clean activation, as in the CE splice
    _, kept_ce, kept_kl = splice_ce_kl(model, tokens, HOOK, noisy, keep_positions=[0, 1])

    def noisy_but_0_1(act, hook):
        out = noisy(act)
        out[:, :2] = act[:, :2]
        return out

    with torch.no_grad():
        kept_BSV = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, noisy_but_0_1)])
    assert kept_kl == pytest.approx(_kl_by_hand(clean_BSV, kept_BSV), rel=1e-4)
    assert kept_ce == pytest.approx(ce_loss(model, tokens, HOOK, noisy, keep_positions=[0, 1]), abs=1e-6)
    # identity splice: the clean distribution
    assert splice_ce_kl(model, tokens, HOOK, lambda a: a)[2] == pytest.approx(0, abs=1e-7)


def test_lm_baseline_kl_zero_by_hand(env):
    model, tokens = env["model"], env["tokens"]
    excl = json.loads(env["baselines"]["excl"].read_text())
    none = json.loads(env["baselines"]["none"].read_text())

    def zero_but_0(act, hook):
        out = torch.zeros_like(act)
        out[:, 0] = act[:, 0]
        return out

    with torch.no_grad():
        clean = model(tokens)
        zero_kept = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, zero_but_0)])
        zero_all = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: torch.zeros_like(act))])
    assert excl["kl_div_zero"] == pytest.approx(_kl_by_hand(clean, zero_kept), rel=1e-4)
    assert none["kl_div_zero"] == pytest.approx(_kl_by_hand(clean, zero_all), rel=1e-4)
    assert excl["kl_div_zero"] != pytest.approx(none["kl_div_zero"], rel=1e-3)


# ---- KL in evaluate_sae -------------------------------------------------------------------------


def test_kl_of_perfect_zero_and_shrunk_saes(env):
    perfect = _evaluate(env, _perfect_sae(), "kl-perfect")
    assert perfect.kl_div_reconstructed == pytest.approx(0, abs=1e-7)
    assert perfect.kl_div_score == pytest.approx(1, abs=1e-6)
    zero = _evaluate(env, _zero_sae(), "kl-zero")
    assert zero.kl_div_zero == pytest.approx(json.loads(env["baselines"]["excl"].read_text())["kl_div_zero"])
    assert zero.kl_div_reconstructed == pytest.approx(zero.kl_div_zero, rel=1e-5)
    assert zero.kl_div_score == pytest.approx(0, abs=1e-5)
    half = _evaluate(env, _scaled_sae(0.5), "kl-half")
    assert 0 < half.kl_div_reconstructed < half.kl_div_zero
    assert half.kl_div_score == pytest.approx(1 - half.kl_div_reconstructed / half.kl_div_zero)


def test_kl_keeps_excluded_positions_clean(env):
    garbage_D = 100.0 * torch.randn(D, generator=torch.Generator().manual_seed(1))
    perfect = _evaluate(env, _perfect_sae(), "kl-perfect-excl")
    excluded = _evaluate(env, _perfect_sae(garbage_D), "kl-garbage-excl")
    included = _evaluate(env, _perfect_sae(garbage_D), "kl-garbage-none", shard="none")
    # garbage only at the excluded position 0: never spliced in, the KL of the perfect SAE
    assert excluded.kl_div_reconstructed == pytest.approx(perfect.kl_div_reconstructed, abs=1e-7)
    assert excluded.kl_div_score == pytest.approx(1, abs=1e-6)
    # without the exclusion the same SAE is charged for it
    assert included.kl_div_reconstructed > 1e-3
    assert included.kl_div_score < 1 - 1e-3


# ---- cosine, l2 ratio, relative reconstruction bias ---------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0, -1.0])
def test_shrinkage_metrics_of_scaled_reconstructions(env, scale):
    """x_hat = s x: cos = sign(s), ||x_hat|| / ||x|| = |s|, gamma = E||s x||^2 / E[s x . x] = s."""
    stats = reconstruction_stats(_scaled_sae(scale), [env["shards"]["excl"]], 100, "cpu", 64)
    assert stats["cossim"] == pytest.approx(math.copysign(1, scale), abs=1e-5)
    assert stats["l2_ratio"] == pytest.approx(abs(scale), rel=1e-5)
    assert stats["relative_reconstruction_bias"] == pytest.approx(scale, rel=1e-5)


def test_shrinkage_metrics_by_hand_and_of_a_zero_output(env):
    shard = env["shards"]["excl"]
    sae = build_sae({"arch": "topk", "d_in": D, "width": 64, "k": 4, "auxk": False}).eval()
    stats = reconstruction_stats(sae, [shard], 100, "cpu", 64)  # 100-row batches: several
    x = torch.from_numpy(read_shard(shard).kept_acts()).double()
    with torch.no_grad():
        x_hat = sae(x.float()).x_hat_BD.double()
    assert stats["n_tokens"] == len(x) and len(x) > 100
    cos = (x * x_hat).sum(1) / (x.norm(dim=1) * x_hat.norm(dim=1))
    assert stats["cossim"] == pytest.approx(float(cos.mean()), rel=1e-5)
    assert stats["l2_ratio"] == pytest.approx(float((x_hat.norm(dim=1) / x.norm(dim=1)).mean()), rel=1e-5)
    gamma = float(x_hat.pow(2).sum(1).mean() / (x * x_hat).sum(1).mean())
    assert stats["relative_reconstruction_bias"] == pytest.approx(gamma, rel=1e-5)
    # x_hat = 0: cosine 0 (not NaN), ratio 0, gamma undefined
    zero = reconstruction_stats(_zero_sae(), [shard], 100, "cpu", 64)
    assert zero["cossim"] == 0 and zero["l2_ratio"] == 0 and zero["relative_reconstruction_bias"] is None


def test_excluded_positions_are_left_out_of_the_shrinkage_metrics(env):
    garbage_D = 100.0 * torch.randn(D, generator=torch.Generator().manual_seed(1))
    stats = reconstruction_stats(_perfect_sae(garbage_D), [env["shards"]["excl"]], 100, "cpu", 64)
    assert stats["cossim"] == pytest.approx(1, abs=1e-5)
    assert stats["l2_ratio"] == pytest.approx(1, rel=1e-5)
    assert stats["relative_reconstruction_bias"] == pytest.approx(1, rel=1e-5)
    included = reconstruction_stats(_perfect_sae(garbage_D), [env["shards"]["none"]], 100, "cpu", 64)
    assert included["l2_ratio"] > 1.01


# ---- metrics.json -> table.parquet -> metrics.html -----------------------------------------------

NEW = ("kl_div_reconstructed", "kl_div_zero", "kl_div_score", "cossim", "l2_ratio", "relative_reconstruction_bias")


def test_new_metrics_reach_the_table_and_the_page(env, tmp_path):
    root = env["root"]
    names = {"table-perfect": _perfect_sae(), "table-half": _scaled_sae(0.5)}
    for name, sae in names.items():
        _evaluate(env, sae, name)
    dirs = [str(root / n) for n in names]
    table = aggregate(dirs, [f"{d}/metrics.json" for d in dirs], [{"group": "g"}] * 2, str(tmp_path / "table.parquet"))
    rows = {r["sae_id"]: r for r in table.to_pylist()}
    for name in names:
        saved = json.loads((root / name / "metrics.json").read_text())
        assert saved["schema_version"] == SCHEMA_VERSION == 6
        for key in NEW:
            assert rows[name][key] == pytest.approx(saved[key]), (name, key)
    assert rows["table-half"]["l2_ratio"] == pytest.approx(0.5, rel=1e-5)
    assert pq.read_table(tmp_path / "table.parquet").schema.field("kl_div_score").type == pa.float64()
    metrics_table(str(tmp_path / "table.parquet"), str(tmp_path / "metrics.html"))
    page = (tmp_path / "metrics.html").read_text()
    for header in ("KL recon.", "KL zero-abl.", "KL score", "cos(x, x̂)", "‖x̂‖/‖x‖", "rel. recon. bias"):
        assert f"<th>{header}</th>" in page, header
    assert "KL(p_clean ‖ p)" in page and "E‖x̂‖² / E[x̂·x]" in page


def test_old_baseline_without_kl_is_refused(env, tmp_path):
    old = json.loads(env["baselines"]["excl"].read_text())
    del old["kl_div_zero"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="kl_div_zero.*lm_baseline"):
        _evaluate_on(env["root"], env["model_dir"], env["shards"]["excl"], tmp_path / "old.json", _perfect_sae(), "old")


def test_latent_statistics_and_saebench_sums_by_hand(env, tmp_path):
    """Per-latent fire / sequence counts and activation sums (LatentCounts), l1, the l2 norms
    and the legacy explained variance, against a direct computation; batches of 7 rows split
    the sequences, which must still be counted once each."""
    torch.manual_seed(3)
    sae = build_sae({"arch": "topk", "d_in": D, "width": 4 * D, "k": 3, "auxk": False}).eval()
    shard = read_shard(env["shards"]["excl"])
    x = torch.from_numpy(shard.kept_acts()).float()
    seq = torch.from_numpy(shard.kept_sequence_ids())
    assert len(x) % 7 and int(seq.max()) + 1 == len(env["tokens"])  # ragged last batch; every sequence
    latents = LatentCounts(sae.cfg.width, "cpu")
    stats = reconstruction_stats(sae, [env["shards"]["excl"]], 7, "cpu", 64, latents)
    with torch.no_grad():
        out = sae(x)
    dense = torch.zeros(len(x), sae.cfg.width).scatter_add(1, out.idx_BK, out.acts_BK.clamp_min(0))
    fired = dense > 0
    assert torch.equal(latents.fire_count_M, fired.sum(0))
    by_seq = torch.stack([fired[seq == s].any(0) for s in range(int(seq.max()) + 1)])
    assert torch.equal(latents.seq_count_M, by_seq.sum(0)) and latents.seq_count_M.sum() > 0
    assert torch.allclose(latents.act_sum_M, dense.double().sum(0))
    assert (latents.n_tokens, latents.n_sequences, stats["n_sequences"]) == (len(x), len(by_seq), len(by_seq))
    assert stats["l1"] == pytest.approx(dense.sum(1).mean().item(), rel=1e-5)
    assert stats["l2_norm_in"] == pytest.approx(x.norm(dim=1).mean().item(), rel=1e-5)
    assert stats["l2_norm_out"] == pytest.approx(out.x_hat_BD.norm(dim=1).mean().item(), rel=1e-5)
    legacy = torch.cat([
        1 - (xb - xh).pow(2).sum(1) / (xb - xb.mean(0)).pow(2).sum(1)
        for xb, xh in zip(x.split(7), out.x_hat_BD.split(7))
    ])  # fmt: skip
    assert stats["explained_variance_legacy"] == pytest.approx(legacy.mean().item(), rel=1e-4)
    assert stats["dead_fraction"] == pytest.approx((~fired.any(0)).float().mean().item())
    # the evaluate stage writes them beside metrics.json; read back intact
    sae.cfg.hook, sae.cfg.model_id = HOOK, model_id(env["model_dir"])
    save_sae(sae, tmp_path / "s")
    evaluate_sae(
        EVAL_CFG, str(tmp_path / "s"), str(env["model_dir"]), [env["shards"]["excl"]],
        str(env["baselines"]["excl"]), str(tmp_path / "s/metrics.json"), str(tmp_path / "s" / LATENT_STATS),
    )  # fmt: skip
    saved = read_latent_stats(tmp_path / "s" / LATENT_STATS)
    assert (saved.n_tokens, saved.n_sequences) == (len(x), len(by_seq))
    assert torch.equal(saved.fire_count_M, fired.sum(0)) and torch.equal(saved.seq_count_M, by_seq.sum(0))
    assert saved.act_sum_M.dtype == torch.float64


def test_cached_clean_logits_give_the_same_metrics(env, tmp_path):
    """lm_baseline's cache of the clean logits: evaluate reads it instead of rerunning the clean
    model, with bitwise the same CE and KL (and lm_baseline's own numbers are unchanged); over
    `clean_logits_max_gb` it writes an empty array and evaluate recomputes; a cache for other
    sequences is refused."""
    shard, baseline = env["shards"]["excl"], env["baselines"]["excl"]
    cached = tmp_path / "clean.npy"
    with_cache = lm_baseline(EVAL_CFG, str(env["model_dir"]), [shard], str(tmp_path / "b.json"), str(cached))
    assert with_cache["clean_logits_cached"]
    assert {k: v for k, v in with_cache.items() if k != "clean_logits_cached"} == {
        k: v for k, v in json.loads(baseline.read_text()).items() if k != "clean_logits_cached"
    }
    seqs = len(env["tokens"])
    assert np.load(cached).shape[0] == seqs * (env["tokens"].shape[1] - 1)
    sae = _scaled_sae(0.5)
    sae.cfg.hook, sae.cfg.model_id = HOOK, model_id(env["model_dir"])
    save_sae(sae, tmp_path / "s")
    runs = {}
    for name, cache in (("recomputed", None), ("cached", str(cached))):
        runs[name] = evaluate_sae(
            EVAL_CFG, str(tmp_path / "s"), str(env["model_dir"]), [shard], str(baseline),
            str(tmp_path / f"{name}.json"), clean_logits=cache,
        )  # fmt: skip
    for key in ("ce_loss_reconstructed", "kl_div_reconstructed", "kl_div_score"):
        assert getattr(runs["cached"], key) == getattr(runs["recomputed"], key), key
    assert runs["cached"].kl_div_reconstructed > 0
    small = EvalConfig(**{**asdict(EVAL_CFG), "clean_logits_max_gb": 0.0})
    none = lm_baseline(small, str(env["model_dir"]), [shard], str(tmp_path / "n.json"), str(tmp_path / "none.npy"))
    assert not none["clean_logits_cached"]
    assert np.load(tmp_path / "none.npy").size == 0
    stale = tmp_path / "stale.npy"
    np.save(stale, np.load(cached)[:-1])
    with pytest.raises(ValueError, match="stale"):
        evaluate_sae(
            EVAL_CFG, str(tmp_path / "s"), str(env["model_dir"]), [shard], str(baseline),
            str(tmp_path / "x.json"), clean_logits=str(stale),
        )  # fmt: skip
