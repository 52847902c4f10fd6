"""The `maxact` stage: top-activating contexts of a sample of each SAE's features.

One streaming pass over the eval shards keeps, for EVERY latent, its `top_examples`
highest activations and `random_examples` activations drawn uniformly (a random key per
activation, keep the largest keys), so memory is O(width x examples), not O(tokens).
Then `features` latents that fired are sampled, each example's context window is
re-encoded to get the feature's activation on every context token, and `negative_examples`
random windows where the feature never fires are added (held-out negatives for
autointerp). Output: one parquet row per (feature, example); see `COLUMNS`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from saepipe.data.shards import check_compatible, keep_mask, read_meta, read_shard
from saepipe.devices import resolve_device
from saepipe.io import atomic_path
from saepipe.lm import load_tokenizer
from saepipe.saes import load_sae

COLUMNS = {
    "sae_id": "SAE id (sweep point)",
    "feature": "global latent index",
    "expert": "expert owning the latent (MoE SAEs; null for dense)",
    "frequency": "fraction of scanned tokens (excluded positions left out) on which the feature is active",
    "kind": "top (highest activations) | random (uniform over activations) | negative (feature off)",
    "rank": "rank within (feature, kind); 0 = highest activation for `top`",
    "row": "row of the example token in the concatenated eval shards",
    "activation": "feature activation on the example token (normalised units)",
    "token_ids": "context token ids",
    "tokens": "context tokens decoded one by one",
    "token_acts": "feature activation on every context token",
    "marked": "index of the example token within the context",
    "text": "context text with the example token marked as «token»",
}


@dataclass
class MaxActConfig:
    features: int = 32
    """Features sampled per SAE, uniformly among those that fire on the scanned tokens."""
    top_examples: int = 10
    """Highest-activating contexts kept per feature."""
    random_examples: int = 10
    """Activating contexts drawn uniformly from all of a feature's activations
    (held-out positives for autointerp scoring)."""
    negative_examples: int = 10
    """Random contexts in which the feature never fires (held-out negatives)."""
    context_before: int = 12
    """Tokens of context shown before the example token (within its sequence)."""
    context_after: int = 4
    """Tokens of context shown after the example token."""
    tokens: int = 131_072
    """Eval tokens scanned (from the start of the eval shards)."""
    batch_size: int = 8192
    """Activations per SAE forward pass."""
    seed: int = 0
    """Seed of the feature sample, the random examples and the negatives."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""


def keep_top_per_group(group_L: torch.Tensor, score_L: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the `n` largest scores of every group (ties: earlier entries first)."""
    order = torch.argsort(score_L, descending=True, stable=True)
    order = order[torch.argsort(group_L[order], stable=True)]
    sorted_groups = group_L[order]
    rank = torch.arange(len(order), device=group_L.device) - torch.searchsorted(sorted_groups, sorted_groups)
    return order[rank < n]


class _Reservoir:
    """Per-latent top-n by a score, over a stream of (latent, score, activation, row)."""

    def __init__(self, n: int, width: int):
        self.n, self.limit = n, max(4 * n * width, 1 << 16)
        self.parts: list[torch.Tensor] = []  # rows of [latent, score, activation, row] (float64)
        self.size = 0

    def add(self, latent_L, score_L, act_L, row_L) -> None:
        self.parts.append(torch.stack([latent_L.double(), score_L.double(), act_L.double(), row_L.double()], 1))
        self.size += len(latent_L)
        if self.size > self.limit:
            self.compact()

    def compact(self) -> torch.Tensor:
        data = torch.cat(self.parts) if self.parts else torch.zeros(0, 4, dtype=torch.float64)
        data = data[keep_top_per_group(data[:, 0].long(), data[:, 1], self.n)]
        self.parts, self.size = [data], len(data)
        return data


@torch.no_grad()
def scan(sae, shards: list[str], cfg: MaxActConfig, device) -> dict:
    """One pass over the eval shards: per-latent top and random examples, firing counts."""
    top, rand = _Reservoir(cfg.top_examples, sae.cfg.width), _Reservoir(cfg.random_examples, sae.cfg.width)
    counts = torch.zeros(sae.cfg.width, dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg.seed)
    offset, n_kept = 0, 0
    for path in shards:
        shard = read_shard(path)
        acts_TD = shard.acts_TD[: max(0, cfg.tokens - offset)]
        keep_T = torch.from_numpy(keep_mask(shard.positions_T[: len(acts_TD)], shard.meta.get("exclude_positions")))
        n_kept += int(keep_T.sum())
        for start in range(0, len(acts_TD), cfg.batch_size):
            x_BD = torch.from_numpy(acts_TD[start : start + cfg.batch_size]).to(device).float()
            enc = sae.encode(x_BD)
            # rows at excluded positions (e.g. GPT-2's BOS) are never examples
            active = (enc.acts_BK > 0).cpu() & keep_T[start : start + len(x_BD), None]
            latent = enc.idx_BK.cpu()[active]
            value = enc.acts_BK.float().cpu()[active]
            row = (torch.arange(len(x_BD)) + offset + start)[:, None].expand_as(active)[active]
            counts += torch.bincount(latent, minlength=sae.cfg.width)
            top.add(latent, value, value, row)
            rand.add(latent, torch.rand(len(latent), generator=gen, dtype=torch.float64), value, row)
        offset += len(acts_TD)
        if offset >= cfg.tokens:
            break
    return {
        "top": top.compact(),
        "random": rand.compact(),
        "counts": counts,
        "n_tokens": offset,
        "n_kept": max(1, n_kept),
    }


class _EvalTokens:
    """Tokens, positions and lazily read activations of the first `n` eval rows."""

    def __init__(self, shards: list[str], n: int):
        self.shards, self.starts, tokens, positions = list(shards), [], [], []
        total = 0
        for path in self.shards:
            if total >= n:
                break
            shard = read_shard(path, with_acts=False)
            take = min(len(shard.tokens_T), n - total)
            self.starts.append(total)
            tokens.append(shard.tokens_T[:take])
            positions.append(shard.positions_T[:take])
            total += take
        self.tokens_T, self.positions_T = np.concatenate(tokens), np.concatenate(positions)
        self.seq_len = int(read_meta(self.shards[0])["seq_len"])

    def window(self, row: int, before: int, after: int) -> tuple[int, int]:
        """[start, stop) rows of the context of `row`, clipped to its sequence."""
        seq_start = row - int(self.positions_T[row])
        seq_stop = min(seq_start + self.seq_len, len(self.tokens_T))
        return max(seq_start, row - before), min(seq_stop, row + after + 1)

    def acts(self, rows: np.ndarray) -> np.ndarray:
        """Activations of the given (sorted, unique) rows, reading each shard once."""
        if len(rows) == 0:
            return np.zeros((0, 0), np.float16)
        out = None
        for i, path in enumerate(self.shards[: len(self.starts)]):
            stop = self.starts[i + 1] if i + 1 < len(self.starts) else len(self.tokens_T)
            sel = rows[(rows >= self.starts[i]) & (rows < stop)]
            if len(sel):
                acts_TD = read_shard(path).acts_TD
                out = np.empty((len(rows), acts_TD.shape[1]), np.float16) if out is None else out
                out[np.searchsorted(rows, sel)] = acts_TD[sel - self.starts[i]]
        if out is None:
            raise ValueError(f"none of the {len(rows)} requested rows is in the eval shards")
        return out


@torch.no_grad()
def _feature_acts(sae, acts_UD: np.ndarray, features_U: torch.Tensor, device, batch_size: int) -> np.ndarray:
    """Activation of feature `features_U[u]` on row `acts_UD[u]`."""
    out = []
    for start in range(0, len(acts_UD), batch_size):
        x_BD = torch.from_numpy(acts_UD[start : start + batch_size]).to(device).float()
        enc = sae.encode(x_BD)
        f_B = features_U[start : start + batch_size].to(device)
        out.append((enc.acts_BK.float() * (enc.idx_BK == f_B[:, None])).sum(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def sample_features(counts: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` latents drawn uniformly among those that fired (sorted)."""
    alive = torch.nonzero(counts > 0).flatten()
    gen = torch.Generator().manual_seed(seed + 1)
    return alive[torch.randperm(len(alive), generator=gen)[:n]].sort().values


def max_activating_examples(
    cfg: MaxActConfig, sae_dir: str | Path, tokenizer_dir: str | Path, shards: list[str], out_parquet: str | Path
) -> pa.Table:
    """The `maxact` stage for one SAE: writes `out_parquet` (columns: `COLUMNS`)."""
    check_compatible([read_meta(p) for p in shards], shards)
    device = resolve_device(cfg.device)
    sae = load_sae(sae_dir).to(device).eval()
    sae_id = Path(sae_dir).name
    found = scan(sae, shards, cfg, device)
    features = sample_features(found["counts"], cfg.features, cfg.seed)
    evals = _EvalTokens(shards, found["n_tokens"])
    gen = torch.Generator().manual_seed(cfg.seed + 2)

    examples = []  # (feature, kind, rank, row, activation)
    for kind in ("top", "random"):
        data = found[kind]
        data = data[torch.isin(data[:, 0].long(), features)]
        order = np.lexsort((-data[:, 1].numpy(), data[:, 0].numpy()))
        last, rank = None, 0
        for f, _, act, row in data[order].tolist():
            rank = rank + 1 if f == last else 0
            last = f
            examples.append((int(f), kind, rank, int(row), act))
    # negatives: 4x oversampled random rows, kept after re-encoding if the feature is off
    candidates = torch.randint(0, found["n_tokens"], (len(features), 4 * cfg.negative_examples), generator=gen)
    for f, rows in zip(features.tolist(), candidates.tolist()):
        examples += [(f, "candidate", 0, r, 0.0) for r in rows]

    windows = [evals.window(row, cfg.context_before, cfg.context_after) for _, _, _, row, _ in examples]
    pair_rows = np.concatenate([np.arange(a, b) for a, b in windows]) if windows else np.zeros(0, int)
    pair_feats = (
        np.concatenate([np.full(b - a, ex[0]) for ex, (a, b) in zip(examples, windows)]) if windows else pair_rows
    )
    unique_rows, inverse = np.unique(pair_rows, return_inverse=True)
    acts_UD = evals.acts(unique_rows)
    token_acts = (
        _feature_acts(sae, acts_UD[inverse], torch.from_numpy(pair_feats).long(), device, cfg.batch_size)
        if len(pair_rows)
        else np.zeros(0, np.float32)
    )

    decode = load_tokenizer(tokenizer_dir)
    n_tokens, counts = found["n_tokens"], found["counts"]
    n_experts = sae.cfg.expert_count
    expert_width = sae.cfg.width // n_experts
    records: list[dict] = []
    negatives: dict = {}
    pos = 0
    for (f, kind, rank, row, act), (a, b) in zip(examples, windows):
        acts_ctx = token_acts[pos : pos + b - a]
        pos += b - a
        if kind == "candidate":
            if acts_ctx.max(initial=0.0) > 0 or negatives.get(f, 0) >= cfg.negative_examples:
                continue
            kind, rank = "negative", negatives.get(f, 0)
            negatives[f] = rank + 1
        ids = evals.tokens_T[a:b].tolist()
        strs = [decode([t]) for t in ids]
        marked = row - a
        records.append(
            {
                "sae_id": sae_id,
                "feature": f,
                "expert": f // expert_width if n_experts > 1 else None,
                "frequency": counts[f].item() / found["n_kept"],
                "kind": kind,
                "rank": rank,
                "row": row,
                "activation": float(act),
                "token_ids": ids,
                "tokens": strs,
                "token_acts": [float(v) for v in acts_ctx],
                "marked": marked,
                "text": "".join(strs[:marked]) + f"«{strs[marked]}»" + "".join(strs[marked + 1 :]),
            }
        )
    schema = pa.schema(
        [
            ("sae_id", pa.string()),
            ("feature", pa.int64()),
            ("expert", pa.int64()),
            ("frequency", pa.float64()),
            ("kind", pa.string()),
            ("rank", pa.int64()),
            ("row", pa.int64()),
            ("activation", pa.float64()),
            ("token_ids", pa.list_(pa.int64())),
            ("tokens", pa.list_(pa.string())),
            ("token_acts", pa.list_(pa.float64())),
            ("marked", pa.int64()),
            ("text", pa.string()),
        ]
    )
    table = pa.Table.from_pylist(records, schema=schema)
    with atomic_path(out_parquet) as tmp:
        pq.write_table(table, str(tmp))
    print(
        f"maxact {sae_id}: {len(features)} features ({int((counts > 0).sum())} of {sae.cfg.width} fire "
        f"on {n_tokens:,} tokens), {len(records)} contexts",
        file=sys.stderr,
    )
    return table
