"""Dictionary-geometry figures of mixture-of-experts SAEs (Switch / Scale).

* :func:`plot_feature_geometry` (Switch paper Fig. 4): per SAE, histograms of the signed
  cosines between decoder features of the same expert vs of two different experts, and the
  ``N x N`` expert similarity heatmap.
* :func:`plot_tsne` (Switch paper Fig. 5): t-SNE of the encoder and decoder feature
  directions of one SAE, coloured by the expert that owns each feature.

The numbers come from :mod:`saepipe.evaluate.geometry`; this module only draws them.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import BoundaryNorm, ListedColormap

from saepipe.evaluate.geometry import (
    expert_similarity_matrix,
    within_between_cosines,
)
from saepipe.plots.style import save
from saepipe.saes import load_config, load_sae

__all__ = ["encoder_features", "plot_feature_geometry", "plot_tsne"]

MAX_PAIRS = 100_000  # cosine pairs sampled per population (within / between) for histograms
MAX_ROWS = 4
N_BINS = 80  # shared histogram bins on [-1, 1] (width 0.025)
# t-SNE runs single-threaded: Barnes-Hut's OpenMP threads slow down several-fold when other
# jobs share the cores (measured 8 s -> 40+ s per panel on a busy 2-core box), while one
# thread takes a predictable ~6-9 s per 3000-point panel and is run-to-run reproducible.
# angle 0.6 (sklearn default 0.5) and 750 iterations (default 1000) cut the time by ~30%
# for a final KL divergence within 1% of the defaults (M=8192, d=128 decoder, 3000 points).
TSNE_ANGLE = 0.6
TSNE_MAX_ITER = 750


def _moe_config(sae_dir: str | os.PathLike):
    """Config of a saved MoE SAE; ``ValueError`` if the SAE has no experts (or just one)."""
    cfg = load_config(sae_dir)
    n_experts = cfg.expert_count
    if not cfg.ROUTED:
        raise ValueError(
            f"{sae_dir}: arch {cfg.arch!r} is not a mixture-of-experts SAE; the expert "
            "geometry figures need a routed SAE (ROUTED trait, e.g. Switch or Scale)"
        )
    if n_experts < 2:
        raise ValueError(
            f"{sae_dir}: {cfg.arch} SAE with n_experts={n_experts}; the expert geometry figures need at least 2 experts"
        )
    return cfg


def _describe(sae_dir: str | os.PathLike, cfg) -> str:
    return (
        f"{Path(sae_dir).resolve().name}  ({cfg.arch}, N={cfg.expert_count} experts, M={cfg.width} latents, k={cfg.k})"
    )


def _expert_ticks(ax, N: int) -> None:
    step = max(1, int(np.ceil(N / 16)))
    ticks = np.arange(0, N, step)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)


def plot_feature_geometry(sae_dirs: list[str], out_png: str) -> None:
    """Within- vs between-expert decoder cosines and expert similarity, one row per SAE.

    ``sae_dirs``: 1-4 saved Switch / Scale SAE directories (``ValueError`` otherwise).
    Left panel: density histograms (shared bins on [-1, 1], log y) of the signed cosines of
    up to ``MAX_PAIRS`` decoder-row pairs inside one expert and across two experts
    (:func:`within_between_cosines`, seed 0). Right panel: the ``N x N`` mean signed cosine
    between experts' decoder rows (:func:`expert_similarity_matrix`; the diagonal excludes
    self-pairs), diverging colormap centred at 0.
    """
    sae_dirs = [str(d) for d in sae_dirs]
    if not 1 <= len(sae_dirs) <= MAX_ROWS:
        raise ValueError(f"plot_feature_geometry takes 1-{MAX_ROWS} SAE directories, got {len(sae_dirs)}")
    cfgs = [_moe_config(d) for d in sae_dirs]  # validate all before the (slower) loading

    fig = plt.figure(figsize=(12, 4.3 * len(sae_dirs)), constrained_layout=True)
    rows = fig.subfigures(len(sae_dirs), 1, squeeze=False)[:, 0]
    bins = np.linspace(-1.0, 1.0, N_BINS + 1)
    for subfig, sae_dir, cfg in zip(rows, sae_dirs, cfgs):
        N = cfg.expert_count
        W_dec = load_sae(sae_dir).W_dec.detach()
        within, between = (t.numpy() for t in within_between_cosines(W_dec, N, MAX_PAIRS, seed=0))
        sim = expert_similarity_matrix(W_dec, N).numpy()

        ax_h, ax_m = subfig.subplots(1, 2, gridspec_kw={"width_ratios": [1.55, 1]})
        for vals, label, color in (
            (within, "within one expert", "tab:blue"),
            (between, "between two experts", "tab:orange"),
        ):
            ax_h.hist(vals, bins=bins, density=True, histtype="stepfilled", alpha=0.25, color=color)
            ax_h.hist(
                vals,
                bins=bins,
                density=True,
                histtype="step",
                linewidth=1.6,
                color=color,
                label=f"{label}: mean {vals.mean():+.4f} ({len(vals):,} pairs)",
            )
            ax_h.axvline(vals.mean(), color=color, linestyle="--", linewidth=1)
        d = W_dec.shape[1]  # reference: cosine of two independent uniform directions in R^d
        c = np.linspace(-0.999, 0.999, 2001)
        ref = np.exp(0.5 * (d - 3) * np.log1p(-c * c))
        ref /= ref.sum() * (c[1] - c[0])
        ax_h.plot(
            c,
            ref,
            color="0.35",
            linestyle=":",
            linewidth=1.4,
            label=f"two random directions in $\\mathbb{{R}}^{{{d}}}$ (reference)",
        )
        ax_h.set_yscale("log")
        top = max(np.histogram(v, bins=bins, density=True)[0].max() for v in (within, between))
        ax_h.set_ylim(0.3 / max(len(within), len(between)) / (bins[1] - bins[0]), top * 30)
        ax_h.set_xlim(-1, 1)
        ax_h.set_xlabel("cosine similarity of two decoder feature directions")
        ax_h.set_ylabel("density (log scale)")
        ax_h.set_title("Decoder cosines: same expert vs different experts")
        ax_h.grid(True, which="major", alpha=0.3)
        ax_h.legend(fontsize=8, loc="upper left", framealpha=0.9)

        vmax = float(np.abs(sim).max()) or 1.0
        im = ax_m.imshow(sim, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        if N <= 8:  # values in the cells, 2 significant digits of the largest |entry|
            decimals = max(0, 1 - int(np.floor(np.log10(vmax))))
            for i in range(N):
                for j in range(N):
                    v = round(float(sim[i, j]), decimals) + 0.0  # + 0.0: no "-0.000"
                    ax_m.text(
                        j,
                        i,
                        f"{v:.{decimals}f}",
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="white" if abs(sim[i, j]) > 0.6 * vmax else "black",
                    )
        _expert_ticks(ax_m, N)
        ax_m.set_xlabel("expert j")
        ax_m.set_ylabel("expert i")
        ax_m.set_title("Expert similarity (diagonal: distinct pairs only)")
        cbar = subfig.colorbar(im, ax=ax_m, shrink=0.9)
        cbar.set_label("mean cosine, decoder rows of expert i vs j")
        subfig.suptitle(_describe(sae_dir, cfg), fontsize=12, fontweight="bold")

    save(fig, out_png)


def encoder_features(sae) -> tuple[torch.Tensor, str]:
    """Encoder feature directions as rows ``[M, d]`` and a panel label.

    ``SAE.encoder_features_MD``: the encoder as the forward pass uses it (Scale with feature
    scaling on: the feature-scaled ``W_hat``, not the raw saved ``W_enc``).
    """
    label = "Encoder (effective Ŵ_enc columns)" if sae.cfg.omega_active else "Encoder (W_enc columns)"
    return sae.encoder_features_MD(), label


def _expert_colors(N: int):
    """Categorical colormap with N colours and a matching norm (expert id -> colour)."""
    if N <= 10:
        cmap = ListedColormap(plt.get_cmap("tab10").colors[:N])
    elif N <= 20:
        cmap = ListedColormap(plt.get_cmap("tab20").colors[:N])
    else:
        cmap = ListedColormap(plt.get_cmap("turbo")(np.linspace(0.03, 0.97, N)))
    return cmap, BoundaryNorm(np.arange(N + 1) - 0.5, N)


def plot_tsne(sae_dir: str, out_png: str, max_points: int = 3000, seed: int = 0) -> None:
    """t-SNE of one MoE SAE's encoder and decoder feature directions, coloured by expert.

    Rows of the decoder and columns of the (effective) encoder are L2-normalised; the same
    ``min(M, max_points)`` features, drawn uniformly without replacement with a generator
    seeded by ``seed``, go into both panels. Each panel is an independent
    ``sklearn.manifold.TSNE(init="pca", perplexity=30, random_state=seed)`` embedding
    (perplexity lowered for tiny samples; single-threaded, ``angle=TSNE_ANGLE``,
    ``max_iter=TSNE_MAX_ITER``). ``ValueError`` if ``sae_dir`` is not a Switch /
    Scale SAE with at least 2 experts.
    """
    from sklearn.manifold import TSNE  # scikit-learn is only needed for this figure
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    cfg = _moe_config(sae_dir)
    if max_points < 4:
        raise ValueError(f"max_points must be >= 4, got {max_points}")
    sae = load_sae(sae_dir)
    N, M = cfg.expert_count, cfg.width
    n = M // N
    W_enc_MD, enc_label = encoder_features(sae)
    W_dec_MD = sae.W_dec.detach()

    rng = np.random.default_rng(seed)
    idx = np.arange(M) if M <= max_points else np.sort(rng.choice(M, max_points, replace=False))
    expert = idx // n
    order = rng.permutation(len(idx))  # draw order: no expert systematically on top
    perplexity = float(min(30.0, (len(idx) - 1) / 3.0))

    cmap, norm = _expert_colors(N)
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.2), constrained_layout=True)
    panels = ((axes[0], W_enc_MD, enc_label), (axes[1], W_dec_MD, "Decoder (W_dec rows)"))
    for ax, W, label in panels:
        X = torch.nn.functional.normalize(W[torch.from_numpy(idx)].float(), dim=1).numpy()
        tsne = TSNE(
            n_components=2,
            init="pca",
            perplexity=perplexity,
            learning_rate="auto",
            angle=TSNE_ANGLE,
            max_iter=TSNE_MAX_ITER,
            random_state=seed,
        )
        with threadpool_limits(limits=1):  # single-threaded: see the note above TSNE_ANGLE
            Y = tsne.fit_transform(X.astype(np.float64))
        sc = ax.scatter(
            Y[order, 0],
            Y[order, 1],
            c=expert[order],
            cmap=cmap,
            norm=norm,
            s=5 if len(idx) > 1000 else 12,
            alpha=0.8,
            linewidths=0,
        )
        ax.set_title(f"{label}, L2-normalised")
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal", adjustable="datalim")

    if N <= 20:
        handles = [plt.Line2D([], [], marker="o", linestyle="", markersize=7, color=cmap(norm(i))) for i in range(N)]
        fig.legend(
            handles, [str(i) for i in range(N)], title="expert", loc="outside right center", fontsize=9, frameon=False
        )
    else:
        cbar = fig.colorbar(sc, ax=axes, shrink=0.8, ticks=np.arange(0, N, max(1, N // 16)))
        cbar.set_label("expert id")
    shown = f"all {M:,} features" if len(idx) == M else f"{len(idx):,} of {M:,} features (uniform random sample)"
    fig.suptitle(
        f"t-SNE of feature directions coloured by expert: {_describe(sae_dir, cfg)}\n"
        f"{shown}; perplexity {perplexity:.3g}, seed {seed}",
        fontsize=11,
    )
    save(fig, out_png)
