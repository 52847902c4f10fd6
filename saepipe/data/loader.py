"""Streaming, shuffled batches of activations from Zarr shards.

Never holds more than about `buffer_shards` + 1 shards in memory: shards are visited in a
random order each epoch, appended to a shuffle buffer, and once the buffer holds
`buffer_shards` shards worth of rows it is permuted and all but one shard's worth is
emitted as batches; the rest stays to be mixed with the next shard.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from saepipe.data.shards import read_shard


class ShardStream:
    """Yields float32 [batch_size, d] tensors (raw units) for `total_tokens` tokens."""

    def __init__(self, paths: list[str | os.PathLike], batch_size: int, total_tokens: int,
                 seed: int = 0, buffer_shards: int = 2, device: torch.device | str = "cpu"):
        if not paths:
            raise ValueError("no activation shards given")
        self.paths = list(paths)
        self.batch_size = batch_size
        self.total_tokens = total_tokens
        self.buffer_shards = max(1, buffer_shards)
        self.rng = np.random.default_rng(seed)
        self.device = torch.device(device)
        self.epochs = 0

    def __len__(self) -> int:
        return self.total_tokens // self.batch_size

    def _rows(self) -> Iterator[np.ndarray]:
        """Shuffled rows, endlessly, in chunks."""
        while True:
            buffer: list[np.ndarray] = []
            order = self.rng.permutation(len(self.paths))
            for i, idx in enumerate(order):
                acts = read_shard(self.paths[idx]).acts_TD
                buffer.append(acts)
                if len(buffer) >= self.buffer_shards or i == len(order) - 1:
                    rows = np.concatenate(buffer)
                    rows = rows[self.rng.permutation(len(rows))]
                    keep = 0 if i == len(order) - 1 else len(acts)
                    yield rows[: len(rows) - keep]
                    buffer = [rows[len(rows) - keep :]] if keep else []
            self.epochs += 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        emitted, pending = 0, np.empty((0, 0), np.float16)
        for chunk in self._rows():
            pending = chunk if pending.size == 0 else np.concatenate([pending, chunk])
            while len(pending) >= self.batch_size:
                if emitted + self.batch_size > self.total_tokens:
                    return
                batch, pending = pending[: self.batch_size], pending[self.batch_size :]
                emitted += self.batch_size
                yield torch.from_numpy(batch).to(self.device, non_blocking=True).float()
            if emitted + self.batch_size > self.total_tokens:
                return
