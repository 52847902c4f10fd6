"""Streaming, shuffled batches of activations from Zarr shards, resumable at any step.

The row order is a pure function of (shards, seed, buffer_shards): epoch e visits the
shards in a random order drawn from (seed, e); consecutive groups of `buffer_shards`
shards form a window whose rows are shuffled together with a permutation drawn from
(seed, e, window). Batch s holds rows [s*B, (s+1)*B) of that endless sequence, so
`batches(start)` continues an interrupted run exactly: it locates the window of row
start*B from the shards' metadata (token_count) and reads nothing before it.

Memory: one window (`buffer_shards` shards) plus the shard being read into it.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from saepipe.data.shards import read_meta, read_shard


class ShardStream:
    """Yields float32 [batch_size, d] tensors (raw units) for `total_tokens` tokens."""

    def __init__(self, paths: list[str | os.PathLike], batch_size: int, total_tokens: int,
                 seed: int = 0, buffer_shards: int = 2, device: torch.device | str = "cpu"):
        if not paths:
            raise ValueError("no activation shards given")
        self.paths = list(paths)
        self.lengths = [int(read_meta(p)["token_count"]) for p in self.paths]
        if not sum(self.lengths):
            raise ValueError(f"the {len(self.paths)} activation shards hold no tokens")
        self.batch_size = batch_size
        self.total_tokens = total_tokens
        self.buffer_shards = max(1, buffer_shards)
        self.seed = seed
        self.device = torch.device(device)

    def __len__(self) -> int:
        return self.total_tokens // self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.batches(0)

    def batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        """Batches number `start`, ..., len(self) - 1 (the same as a full pass would give)."""
        windows = self._rows_from(start * self.batch_size)
        rows, i = np.empty((0, 0), np.float16), 0
        for _ in range(start, len(self)):
            parts, need = [], self.batch_size
            while need:
                if i == len(rows):  # next window; copy the batch's head so the old one is freed
                    parts, rows = [p.copy() for p in parts], None
                    rows, i = next(windows), 0
                parts.append(rows[i : i + need])
                i, need = i + len(parts[-1]), need - len(parts[-1])
            batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
            yield torch.from_numpy(batch).to(self.device, non_blocking=True).float()

    def _rows_from(self, offset: int) -> Iterator[np.ndarray]:
        """Shuffled rows from global row `offset` on, endlessly, one window at a time."""
        epoch, skip = divmod(offset, sum(self.lengths))
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))
            for w, first in enumerate(range(0, len(order), self.buffer_shards)):
                window = order[first : first + self.buffer_shards]
                n = sum(self.lengths[i] for i in window)
                if skip >= n:  # already trained on: not read
                    skip -= n
                    continue
                rows = self._read_window(window, n, np.random.default_rng([self.seed, epoch, w]))
                yield rows[skip:]
                del rows  # before the next window is read
                skip = 0
            epoch += 1

    def _read_window(self, window: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """The window's `n` rows in an order drawn from `rng`, scattered into place shard by shard."""
        dest = np.empty(n, np.int64)
        dest[rng.permutation(n)] = np.arange(n)  # input row r goes to output row dest[r]
        rows, at = None, 0
        for i in window:
            acts = read_shard(self.paths[i]).acts_TD
            if len(acts) != self.lengths[i]:
                raise ValueError(f"{self.paths[i]}: metadata says {self.lengths[i]} tokens but it "
                                 f"holds {len(acts)}; the shard is damaged, delete it to re-extract")
            if rows is None:
                rows = np.empty((n, acts.shape[1]), acts.dtype)
            rows[dest[at : at + len(acts)]] = acts
            at += len(acts)
        return rows
