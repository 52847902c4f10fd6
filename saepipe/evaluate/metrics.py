"""The `lm_baseline` and `evaluate` stages: reconstruction, sparsity and downstream loss.

All metrics are computed on the eval shards (held-out documents), in raw activation
units. CE losses run the LM on whole eval sequences taken from those shards: clean
(`ce_loss_original`), with the hook's output zeroed (`ce_loss_zero`, computed once per
model by `lm_baseline`), and with it replaced by the SAE's reconstruction. The sequence
positions the shards list in `exclude_positions` (e.g. GPT-2's BOS) are left out of the
reconstruction metrics and keep their clean activation in BOTH spliced CE losses (zero and
SAE), so no SAE is charged for a token it never trained on (docs/reference.md §5); the CE itself still
averages over every next-token prediction.

The same passes give the KL divergence of the next-token distribution, clean vs spliced
(`saepipe.lm.splice_ce_kl`), over the same predictions and with the same clean positions:
`kl_div_zero` once per model (`lm_baseline`, from the passes it already runs), and
`kl_div_reconstructed` per SAE (which reruns the clean model beside its CE splice: one more
forward pass per batch). The shrinkage metrics (`cossim`, `l2_ratio`,
`relative_reconstruction_bias`) follow SAEBench's core eval; their formulas are in
`SAEMetrics`.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from saepipe.data.shards import check_compatible, read_meta, read_shard
from saepipe.devices import resolve_device
from saepipe.evaluate.geometry import ExpertUsage, activation_similarity, decoder_redundancy, expert_specialization
from saepipe.io import atomic_path, read_json, write_json
from saepipe.lm import load_lm, splice_ce_kl
from saepipe.saes import load_sae

SCHEMA_VERSION = 6
"""metrics.json semantics. 3: the CE splices keep the shards' exclude_positions clean,
expert usage counts every routed expert (e per token), activation similarity divides by
the measured L0 of its token set. 4: training cost per token (FLOPs and wall-clock).
5: KL divergence (SAE and zero-ablation splices, kl_div_score) and the shrinkage metrics
(cossim, l2_ratio, relative_reconstruction_bias). 6: l1, l2_norm_in, l2_norm_out,
explained_variance_legacy, n_sequences, and the per-latent statistics file (LATENT_STATS)."""

LATENT_STATS = "latent_stats.safetensors"
"""Per-latent statistics on the kept eval tokens, written beside metrics.json by `evaluate`
(:class:`LatentCounts`): what the SAELens export's sparsity file and SAEBench's feature-wise
results are made of, without running the SAE again."""


@dataclass
class EvalConfig:
    ce_tokens: int = 65_536
    """Eval tokens (whole sequences) for the CE losses / loss recovered."""
    ce_batch_size: int = 32
    """Sequences per LM forward pass."""
    batch_size: int = 8192
    """Activations per SAE forward pass for the reconstruction metrics."""
    similarity_tokens: int = 4096
    """First eval tokens whose active-latent sets give the activation similarity (Scale A.4)."""
    clean_logits_max_gb: float = 1.0
    """Largest cache of the clean model's logits on the CE predictions (written by
    `lm_baseline`, once per model; float32, CE sequences x (seq_len - 1) x vocabulary): within it each
    evaluate job reads them instead of rerunning the clean model beside its splice; above it
    (e.g. GPT-2's 50k vocabulary) or at 0, each job recomputes them. The KL is the same."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""


@dataclass
class SAEMetrics:
    """One SAE's evaluation (metrics.json). Units: raw activations of the hook."""

    sae_id: str
    n_tokens: int  # eval activations used for the reconstruction metrics
    mse: float  # mean over tokens and dims of (x - x_hat)^2
    l2_per_token: float  # mean over tokens of ||x - x_hat||^2
    fvu: float  # sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    explained_variance: float  # 1 - fvu
    cossim: float  # mean over tokens of cos(x, x_hat) = x . x_hat / (||x|| ||x_hat||) (SAEBench core
    #   `cossim`; a zero x or x_hat counts 0, where SAEBench would give NaN)
    l2_ratio: float  # mean over tokens of ||x_hat|| / ||x|| (shrinkage; SAEBench core `l2_ratio`,
    #   ||x|| < 1e-4 replaced by 1 as there)
    relative_reconstruction_bias: float | None  # gamma = argmin_g E||x_hat / g - x||^2
    #   = E[||x_hat||^2] / E[x_hat . x] over all the kept eval tokens (Rajamanoharan et al. 2024,
    #   eq. 10; SAEBench core averages this ratio over batches). 1 = unbiased, < 1 = shrinkage;
    #   None if E[x_hat . x] = 0 (e.g. x_hat = 0)
    l0: float  # mean number of active latents per token
    l1: float  # mean over tokens of the sum of the latents' activations (SAEBench core `l1`)
    l2_norm_in: float  # mean over tokens of ||x|| (SAEBench core `l2_norm_in`)
    l2_norm_out: float  # mean over tokens of ||x_hat|| (SAEBench core `l2_norm_out`)
    explained_variance_legacy: float  # mean over tokens of 1 - ||x - x_hat||^2 / ||x - mean(x)||^2,
    #   mean(x) over the token's eval batch (`batch_size` rows; SAEBench core
    #   `explained_variance_legacy`, whose batch is its own); use `explained_variance`
    n_sequences: int  # eval sequences the reconstruction metrics' tokens come from
    dead_fraction: float  # latents never active on the eval tokens
    ce_tokens: int  # tokens the CE losses average over
    ce_loss_original: float
    ce_loss_reconstructed: float
    ce_loss_zero: float
    loss_recovered: float  # (CE_zero - CE_recon) / (CE_zero - CE_orig)
    delta_ce: float  # CE_recon - CE_orig
    kl_div_reconstructed: float  # mean over the CE's next-token predictions (B x (S-1) of the
    #   ce_tokens) of KL(p_clean || p_SAE), the SAE's reconstruction spliced in at the hook,
    #   exclude_positions clean (SAEBench core `kl_div_with_sae`, which also counts the last position)
    kl_div_zero: float  # the same with the hook zero-ablated, exclude_positions clean (lm_baseline;
    #   SAEBench `kl_div_with_ablation`, which zeroes every position)
    kl_div_score: float | None  # (KL_zero - KL_recon) / KL_zero = 1 - KL_recon / KL_zero
    #   (SAEBench core `kl_div_score`); 1 = the clean distribution; None if KL_zero = 0
    flops_per_token: int  # forward FLOPs per token (docs/reference.md §1)
    redundancy_09: float  # fraction of decoder rows with max cosine to another row > 0.9
    redundancy_08: float  # same at 0.8
    mean_max_cos: float  # mean over decoder rows of the max cosine to another row
    activation_similarity: float  # mean over token pairs i != j of |S_i ∩ S_j| / L0, with L0 the
    # MEASURED mean |S_t| of the same first `similarity_tokens`
    # tokens (Scale App. A.4; not the config's k)
    expert_counts: list[int]  # (token, expert) routings per expert, EVERY selected expert counted:
    # sums to e * n_tokens (Switch e = 1, Scale e = active_experts);
    # [n_tokens] if dense
    expert_entropy: float  # entropy (nats) of the expert_counts distribution
    expert_entropy_normalised: float  # entropy / log N (1 = perfectly balanced)
    expert_cdf: list[float]  # cumulative share of expert_counts, experts by descending count
    intra_expert_redundancy: float | None  # MoE: mean over experts of within-expert redundancy_0.9
    inter_expert_redundancy: float | None  # MoE: same on a random n-feature sample of the dictionary
    omega: list[float] | None  # Scale: learned feature-scaling omega per expert
    train_tokens_per_s: float | None  # from the training run (config.json "run")
    wall_time_s: float | None  # training wall time (config.json "run")
    train_flops_per_token: float | None  # forward + backward + optimizer FLOPs per training token
    #   (SAEConfig.train_flops_per_token at the run's batch size: 3 x forward + (12 x parameters
    #   (Adam) + 6 x decoder weights (norm constraint)) / batch_size)
    train_wall_s_per_token: float | None  # measured training wall-clock seconds per token (this machine)
    schema_version: int = SCHEMA_VERSION


def _eval_sequences(shards: list[str], ce_tokens: int) -> torch.Tensor:
    """The first ceil(ce_tokens / seq_len) whole sequences of the eval shards."""
    seqs, have = [], 0
    for path in shards:
        shard = read_shard(path, with_acts=False)
        seq_len = shard.meta["seq_len"]
        need = math.ceil(ce_tokens / seq_len) - have
        block = shard.tokens_T.reshape(-1, seq_len)[:need]
        seqs.append(block)
        have += len(block)
        if have * seq_len >= ce_tokens:
            break
    if have * seq_len < ce_tokens:
        raise ValueError(
            f"evaluate.ce_tokens ({ce_tokens:,}) exceeds the eval shards' "
            f"{have * seq_len:,} tokens; lower it or raise extract.eval_tokens"
        )
    return torch.from_numpy(np.concatenate(seqs)).long()


def _exclude_positions(metas: list[dict], paths: list[str]) -> list[int]:
    """The sequence positions every shard excludes (metadata `exclude_positions`, sorted);
    the shards must agree, since one CE splice serves them all."""
    found = {tuple(sorted(set(m.get("exclude_positions") or []))) for m in metas}
    if len(found) > 1:
        raise ValueError(
            f"the eval shards disagree on exclude_positions ({sorted(found)}) among "
            f"{', '.join(map(str, paths))}; they come from different extract "
            "configs: regenerate them with one extract.exclude_positions"
        )
    return list(found.pop())


def _splice_means(
    model,
    seqs: torch.Tensor,
    batch: int,
    device,
    hook: str,
    replace,
    keep_positions: Sequence[int] = (),
    clean_NV: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """(CE clean, CE spliced, KL(p_clean || p_spliced)), each the sequence-weighted mean over
    `seqs` (every sequence has the same S - 1 predictions, so the mean over predictions);
    `replace` splices the hook activation except at `keep_positions` (the shards'
    exclude_positions), which stay clean (`saepipe.lm.splice_ce_kl`). `clean_NV`: the clean
    logits of every prediction (:func:`_write_clean_logits`), else recomputed per batch."""
    totals = np.zeros(3)
    preds = seqs.shape[1] - 1
    for start in range(0, len(seqs), batch):
        chunk = seqs[start : start + batch].to(device)
        clean = None
        if clean_NV is not None:
            rows = clean_NV[start * preds : (start + len(chunk)) * preds]
            clean = torch.from_numpy(np.array(rows)).to(device)  # a copy: the cache is read-only
        totals += np.array(splice_ce_kl(model, chunk, hook, replace, keep_positions, clean)) * len(chunk)
    clean, spliced, kl = (totals / len(seqs)).tolist()
    return clean, spliced, kl


def lm_baseline(
    cfg: EvalConfig, model_dir: str, shards: list[str], out_json: str, clean_logits_out: str | None = None
) -> dict:
    """CE of the clean model and with the hook zero-ablated, and the KL divergence of the
    zero-ablated next-token distribution from the clean one (shared by every SAE; the same
    two forward passes per batch). The zero-ablation keeps the shards' exclude_positions
    clean, as the SAE splice does. `clean_logits_out`: where the clean logits of those
    passes go for the evaluate jobs (:func:`_write_clean_logits`)."""
    metas = [read_meta(p) for p in shards]
    meta = check_compatible(metas, shards)
    excluded = _exclude_positions(metas, shards)
    device = resolve_device(cfg.device)
    model = load_lm(model_dir, device)
    seqs = _eval_sequences(shards, cfg.ce_tokens)
    clean_NV = None
    if clean_logits_out is not None:
        clean_NV = _write_clean_logits(model, seqs, cfg, device, clean_logits_out)
    clean, zero, kl_zero = _splice_means(
        model, seqs, cfg.ce_batch_size, device, meta["hook"], torch.zeros_like, excluded, clean_NV
    )
    result = {
        "hook": meta["hook"],
        "model": meta["model"],
        "ce_tokens": int(seqs.numel()),
        "exclude_positions": excluded,
        "ce_loss_original": clean,
        "ce_loss_zero": zero,
        "kl_div_zero": kl_zero,
        "clean_logits_cached": clean_NV is not None,
    }
    write_json(out_json, result)
    return result


class LatentCounts:
    """Per-latent sums over the eval tokens, streamed batch by batch: ``fire_count`` (tokens on
    which the latent is > 0), ``seq_count`` (sequences on which it fired at least once) and
    ``act_sum`` (its summed activation). Saved as :data:`LATENT_STATS` (:meth:`save`)."""

    def __init__(self, width: int, device) -> None:
        self.fire_count_M = torch.zeros(width, dtype=torch.int64, device=device)
        self.seq_count_M = torch.zeros(width, dtype=torch.int64, device=device)
        self.act_sum_M = torch.zeros(width, dtype=torch.float64, device=device)
        # the last sequence each latent was counted in: a sequence split between two batches
        # is counted once (batches visit the sequences in order)
        self.last_seq_M = torch.full((width,), -1, dtype=torch.int64, device=device)
        self.n_tokens = self.n_sequences = 0

    def update(self, idx_BK: Tensor, acts_BK: Tensor, seq_B: Tensor) -> None:
        """One batch: code (`idx_BK`, `acts_BK`; entries <= 0 are not active) of the tokens of
        the global sequence ids `seq_B` (non-decreasing, continuing the previous batch's)."""
        width = self.fire_count_M.numel()
        active_BK = acts_BK > 0
        idx_A = idx_BK[active_BK]
        self.fire_count_M += torch.bincount(idx_A, minlength=width)
        self.act_sum_M.index_add_(0, idx_A, acts_BK[active_BK].double())
        pairs_P = torch.unique(seq_B.unsqueeze(1).expand_as(idx_BK)[active_BK] * width + idx_A)
        seq_P, lat_P = pairs_P // width, pairs_P % width
        new_P = seq_P != self.last_seq_M[lat_P]
        self.seq_count_M += torch.bincount(lat_P[new_P], minlength=width)
        self.last_seq_M.scatter_reduce_(0, lat_P, seq_P, reduce="amax")
        self.n_tokens += len(seq_B)
        if len(seq_B):
            self.n_sequences = int(seq_B[-1]) + 1

    def save(self, path: str | os.PathLike) -> None:
        """:data:`LATENT_STATS`: the three tensors (int64, int64, float64) and, as metadata,
        ``n_tokens`` and ``n_sequences``."""
        tensors = {"fire_count": self.fire_count_M, "seq_count": self.seq_count_M, "act_sum": self.act_sum_M}
        with atomic_path(path) as tmp:
            save_file(
                {k: v.cpu().contiguous() for k, v in tensors.items()},
                str(tmp),
                metadata={"n_tokens": str(self.n_tokens), "n_sequences": str(self.n_sequences)},
            )


@dataclass(frozen=True)
class LatentStats:
    """Per-latent counts on the kept eval tokens (the evaluate stage's ``latent_stats.safetensors``)."""

    fire_count_M: Tensor
    """int64 [M]: tokens on which the latent is > 0."""
    seq_count_M: Tensor
    """int64 [M]: eval sequences on which it fired at least once."""
    act_sum_M: Tensor
    """float64 [M]: its summed activation."""
    n_tokens: int
    """Kept eval tokens counted."""
    n_sequences: int
    """Eval sequences those tokens come from."""


def read_latent_stats(path: str | os.PathLike) -> LatentStats:
    """A ``latent_stats.safetensors`` file (tensors ``fire_count``, ``seq_count``, ``act_sum``;
    metadata ``n_tokens``, ``n_sequences``) as :class:`LatentStats`."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        meta = f.metadata() or {}
    missing = ({"fire_count", "seq_count", "act_sum"} - set(tensors)) | ({"n_tokens", "n_sequences"} - set(meta))
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}: rerun the evaluate stage (snakemake --forcerun {path})")
    return LatentStats(
        fire_count_M=tensors["fire_count"].long(),
        seq_count_M=tensors["seq_count"].long(),
        act_sum_M=tensors["act_sum"].double(),
        n_tokens=int(meta["n_tokens"]),
        n_sequences=int(meta["n_sequences"]),
    )


@torch.no_grad()
def _write_clean_logits(model, seqs: torch.Tensor, cfg: EvalConfig, device, out_npy: str) -> np.ndarray | None:
    """The clean model's float32 logits on every next-token prediction of the CE sequences
    ``seqs`` (``[n_seq * (seq_len - 1), V]``, in sequence order, batches of
    ``cfg.ce_batch_size``) as a .npy file that the evaluate jobs read instead of rerunning the
    clean model; returned memory-mapped. When they would exceed ``cfg.clean_logits_max_gb``,
    an empty ``[0, 0]`` array instead (each job recomputes them) and None."""
    preds = seqs.shape[1] - 1
    out = None
    with atomic_path(out_npy) as tmp:
        for start in range(0, len(seqs), cfg.ce_batch_size):
            chunk = seqs[start : start + cfg.ce_batch_size].to(device)
            logits = model(chunk, return_type="logits")[:, :-1]
            if out is None:  # the first batch tells the vocabulary, hence the size
                vocab = logits.shape[-1]
                size_gb = len(seqs) * preds * vocab * 4 / 2**30
                if size_gb > cfg.clean_logits_max_gb:
                    with open(tmp, "wb") as f:  # np.save(path) would append ".npy" to the temporary name
                        np.save(f, np.zeros((0, 0), dtype=np.float32))
                    print(
                        f"clean logits: {size_gb:.2f} GB > evaluate.clean_logits_max_gb "
                        f"({cfg.clean_logits_max_gb}): not cached, each evaluate job recomputes them",
                        file=sys.stderr,
                    )
                    return None
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(seqs) * preds, vocab))
            out[start * preds : (start + len(chunk)) * preds] = logits.reshape(-1, vocab).float().cpu().numpy()
        assert out is not None, "no CE sequences"
        out.flush()
        del out
    print(f"clean logits: {len(seqs) * preds:,} predictions x {vocab:,} ({size_gb:.2f} GB) cached", file=sys.stderr)
    return np.load(out_npy, mmap_mode="r")


def _read_clean_logits(path: str | os.PathLike | None, seqs: torch.Tensor) -> np.ndarray | None:
    """`lm_baseline`'s clean-logit cache for `seqs`, memory-mapped (None: none or not cached)."""
    if path is None:
        return None
    clean_NV = np.load(path, mmap_mode="r")
    if clean_NV.size == 0:
        return None
    if clean_NV.shape[0] != len(seqs) * (seqs.shape[1] - 1):
        raise ValueError(
            f"{path} holds {clean_NV.shape[0]:,} clean predictions but the CE sequences have "
            f"{len(seqs) * (seqs.shape[1] - 1):,}; it is stale: snakemake --forcerun {path}"
        )
    return clean_NV


@torch.no_grad()
def reconstruction_stats(
    sae, shards: list[str], batch_size: int, device, similarity_tokens: int = 4096, latents: LatentCounts | None = None
) -> dict:
    """Streaming sums over the eval shards' kept rows (exclude_positions left out) -> mse,
    l2_per_token, fvu, cossim, l2_ratio, relative_reconstruction_bias (formulas in
    `SAEMetrics`), l0, dead_fraction, expert usage (every routed expert of each token,
    `out.experts_BE`: the counts sum to e * n_tokens) and the activation similarity of the
    first `similarity_tokens` kept tokens (divided by their measured L0). `latents` (optional)
    receives the per-latent counts."""
    usage = ExpertUsage(sae.cfg.expert_count)
    codes: list[tuple[torch.Tensor, torch.Tensor]] = []
    n, sse, sum_sq = 0, 0.0, 0.0
    sum_cos, sum_ratio, sum_xhat_sq, sum_dot = 0.0, 0.0, 0.0, 0.0
    sum_l1, sum_norm_in, sum_norm_out, sum_ev_legacy = 0.0, 0.0, 0.0, 0.0
    latents = latents if latents is not None else LatentCounts(sae.cfg.width, device)
    seq_offset = 0
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64, device=device)
    nnz = 0
    for path in shards:
        shard = read_shard(path)
        acts = shard.kept_acts()  # without the metadata's exclude_positions
        seq_T = torch.from_numpy(shard.kept_sequence_ids() + seq_offset).to(device)
        seq_offset = int(seq_T[-1]) + 1 if len(seq_T) else seq_offset
        for start in range(0, len(acts), batch_size):
            x_BD = torch.from_numpy(acts[start : start + batch_size]).to(device).float()
            out = sae(x_BD)
            active_BK = out.acts_BK > 0
            sq_err_B = (x_BD - out.x_hat_BD).pow(2).sum(-1)
            sse += sq_err_B.sum().item()
            sum_ev_legacy += (1 - sq_err_B.double() / (x_BD - x_BD.mean(0)).pow(2).sum(-1).double()).sum().item()
            sum_sq += x_BD.double().pow(2).sum().item()
            sum_x += x_BD.double().sum(0)
            norm_x_B = x_BD.norm(dim=-1)
            xhat_BD = out.x_hat_BD.float()
            sum_cos += torch.nn.functional.cosine_similarity(x_BD, xhat_BD, dim=-1, eps=1e-8).double().sum().item()
            norm_xhat_B = xhat_BD.norm(dim=-1)
            sum_ratio += (norm_xhat_B / torch.where(norm_x_B < 1e-4, 1.0, norm_x_B)).double().sum().item()
            sum_norm_in += norm_x_B.double().sum().item()
            sum_norm_out += norm_xhat_B.double().sum().item()
            sum_l1 += out.acts_BK.clamp_min(0).double().sum().item()
            sum_xhat_sq += xhat_BD.double().pow(2).sum().item()
            sum_dot += (x_BD.double() * xhat_BD.double()).sum().item()
            nnz += active_BK.sum().item()
            latents.update(out.idx_BK, out.acts_BK, seq_T[start : start + len(x_BD)])
            if out.expert_B is not None and out.experts_BE is None:
                raise ValueError(
                    f"{type(sae).__name__} routes tokens (expert_B) but returns no "
                    "experts_BE; its forward must report every selected expert "
                    "[B, e] (column 0 = top-1) for the expert-usage metrics"
                )
            usage.update(out.experts_BE, n_tokens=len(x_BD))
            if n < similarity_tokens:
                codes.append((out.idx_BK[: similarity_tokens - n].cpu(), out.acts_BK[: similarity_tokens - n].cpu()))
            n += len(x_BD)
    total_var = sum_sq - (sum_x.pow(2).sum().item() / n)
    return {
        "n_tokens": n,
        "mse": sse / (n * sae.cfg.d_in),
        "l2_per_token": sse / n,
        "fvu": sse / total_var,
        "explained_variance": 1 - sse / total_var,
        "cossim": sum_cos / n,
        "l2_ratio": sum_ratio / n,
        "relative_reconstruction_bias": sum_xhat_sq / sum_dot if sum_dot != 0 else None,
        "l0": nnz / n,
        "l1": sum_l1 / n,
        "l2_norm_in": sum_norm_in / n,
        "l2_norm_out": sum_norm_out / n,
        "explained_variance_legacy": sum_ev_legacy / n,
        "n_sequences": latents.n_sequences,
        "dead_fraction": (latents.fire_count_M == 0).float().mean().item(),
        "activation_similarity": activation_similarity(
            torch.cat([c[0] for c in codes]), torch.cat([c[1] for c in codes])
        ),
        **_usage_fields(usage),
    }


def _usage_fields(usage: ExpertUsage) -> dict:
    entropy, normalised = usage.entropy()
    return {
        "expert_counts": usage.counts.tolist(),
        "expert_entropy": entropy,
        "expert_entropy_normalised": normalised,
        "expert_cdf": usage.sorted_cdf(),
    }


@torch.no_grad()
def dictionary_stats(sae) -> dict:
    """Decoder geometry (redundancy, expert specialisation) and the SAE's learned extra
    statistics (``SAE.extra_stats``; ``omega`` is None for SAEs without one)."""
    W_dec_MD = sae.W_dec.detach()
    red = decoder_redundancy(W_dec_MD, thresholds=(0.9, 0.8))
    n_experts = sae.cfg.expert_count
    spec = (
        expert_specialization(W_dec_MD, n_experts)
        if n_experts > 1
        else {"intra_expert_redundancy": None, "inter_expert_redundancy": None}
    )
    return {
        "redundancy_09": red["redundancy_0.9"],
        "redundancy_08": red["redundancy_0.8"],
        "mean_max_cos": red["mean_max_cos"],
        **spec,
        "omega": None,
        **sae.extra_stats(),
    }


def _training_cost(cfg, run: dict) -> dict:
    """Training FLOPs per token (analytic, at the run's batch size) and measured seconds per token."""
    batch = run.get("train", {}).get("batch_size")
    wall, tokens = run.get("wall_time_s"), cfg.training_tokens
    return {
        "train_flops_per_token": float(cfg.train_flops_per_token(batch)) if isinstance(batch, int) else None,
        "train_wall_s_per_token": wall / tokens if wall and tokens else None,
    }


def evaluate_sae(
    cfg: EvalConfig,
    sae_dir: str,
    model_dir: str,
    shards: list[str],
    baseline_json: str,
    out_json: str,
    latent_stats_out: str | None = None,
    clean_logits: str | None = None,
) -> SAEMetrics:
    """The `evaluate` stage for one SAE; writes metrics.json and (when `latent_stats_out` is
    given) the per-latent statistics (:data:`LATENT_STATS`). `clean_logits`: `lm_baseline`'s
    cache of the clean logits (:func:`_write_clean_logits`), read instead of rerunning the
    clean model for the KL."""
    metas = [read_meta(p) for p in shards]
    meta = check_compatible(metas, shards)
    excluded = _exclude_positions(metas, shards)
    baseline = read_json(baseline_json)
    # a baseline from before exclusions were recorded excluded nothing
    if baseline.get("exclude_positions", []) != excluded:
        raise ValueError(
            f"{baseline_json} was computed with exclude_positions "
            f"{baseline.get('exclude_positions', [])} but the eval shards "
            f"exclude {excluded}; its CE_zero is not comparable. Rerun the lm_baseline stage "
            f"(snakemake --forcerun {baseline_json})"
        )
    if "kl_div_zero" not in baseline:
        raise ValueError(
            f"{baseline_json} has no kl_div_zero (written by an older saepipe); rerun the "
            f"lm_baseline stage (snakemake --forcerun {baseline_json})"
        )
    device = resolve_device(cfg.device)
    sae = load_sae(sae_dir).to(device).eval()
    if sae.cfg.hook != meta["hook"] or sae.cfg.model_id != meta["model"]:
        raise ValueError(
            f"SAE {sae_dir} was trained on {sae.cfg.model_id} / {sae.cfg.hook} but the eval "
            f"shards are {meta['model']} / {meta['hook']}; rerun the pipeline so both match"
        )
    latents = LatentCounts(sae.cfg.width, device)
    stats = reconstruction_stats(sae, shards, cfg.batch_size, device, cfg.similarity_tokens, latents)
    if latent_stats_out is not None:
        latents.save(latent_stats_out)
    stats.update(dictionary_stats(sae))
    run = read_json(Path(sae_dir) / "config.json").get("run", {})
    model = load_lm(model_dir, device)
    seqs = _eval_sequences(shards, cfg.ce_tokens)
    # the clean CE is lm_baseline's (the same for every SAE); the clean logits of the KL come
    # from lm_baseline's cache, or are recomputed beside the splice
    _, recon, kl_recon = _splice_means(
        model,
        seqs,
        cfg.ce_batch_size,
        device,
        meta["hook"],
        lambda act: sae(act.reshape(-1, act.shape[-1]).float()).x_hat_BD.reshape(act.shape),
        excluded,
        _read_clean_logits(clean_logits, seqs),
    )
    orig, zero, kl_zero = baseline["ce_loss_original"], baseline["ce_loss_zero"], baseline["kl_div_zero"]
    metrics = SAEMetrics(
        sae_id=Path(sae_dir).name,
        **stats,
        ce_tokens=int(seqs.numel()),
        ce_loss_original=orig,
        ce_loss_reconstructed=recon,
        ce_loss_zero=zero,
        loss_recovered=(zero - recon) / (zero - orig),
        delta_ce=recon - orig,
        kl_div_reconstructed=kl_recon,
        kl_div_zero=kl_zero,
        kl_div_score=1 - kl_recon / kl_zero if kl_zero > 0 else None,
        flops_per_token=int(sae.flops_per_token()),
        train_tokens_per_s=run.get("train_tokens_per_s"),
        wall_time_s=run.get("wall_time_s"),
        **_training_cost(sae.cfg, run),
    )
    write_json(out_json, asdict(metrics))
    print(
        f"evaluate {metrics.sae_id}: l0 {metrics.l0:.1f}, fvu {metrics.fvu:.4f}, "
        f"loss recovered {metrics.loss_recovered:.4f}, KL {metrics.kl_div_reconstructed:.4f}",
        file=sys.stderr,
    )
    return metrics
