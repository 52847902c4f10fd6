"""Streaming, shuffled batches of activations from Zarr shards, resumable at any step.

The row order is a pure function of (shards, seed, buffer_shards): epoch e visits the
shards in a random order drawn from (seed, e); consecutive groups of `buffer_shards`
shards form a window whose rows are shuffled together with a permutation drawn from
(seed, e, window). Batch s holds rows [s*B, (s+1)*B) of that endless sequence, so
`batches(start)` continues an interrupted run exactly: it locates the window of row
start*B from the shards' metadata (token_count) and reads nothing before it (nor any
window after the last batch).

Rows at the sequence positions a shard's metadata lists in `exclude_positions` (e.g.
GPT-2's BOS) are left out; the row counts come from the metadata (token_count, seq_len).

Feeding the accelerator (none of these change the batches, bit for bit):
- prefetch: a background thread reads and shuffles the next window while the current one
  is trained on (`prefetch` windows ahead), and a second one cuts, converts (fp16 ->
  fp32) and moves the next batches to the device, so the training loop only takes them
  (prefetch 0: everything in the consumer's thread);
- pinned memory: on CUDA windows are assembled in page-locked memory and batches are
  copied with non_blocking=True;
- device cache: when all shards fit in `cache_bytes`, they are loaded once onto the device
  (fp16) and each batch is an index_select there with the same permutation.

Integrity: every shard is checked for NaN/inf activations when it is loaded (one
vectorised pass per shard, not per step); a bad row raises NonFiniteActivations naming
the shard and the row.

Memory (streaming): the current window plus, with prefetch, the next window being built,
i.e. about (prefetch + 1) * buffer_shards shards plus the shard being read.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch

from saepipe.data.shards import keep_mask, read_meta, read_shard

T = TypeVar("T")
BATCHES_AHEAD = 4
"""Batches prepared ahead by the batch thread when prefetching."""


class NonFiniteActivations(ValueError):
    """A shard holds NaN or inf activations (training would silently diverge on them)."""


def check_finite(acts_TD: np.ndarray, path: str | os.PathLike, row_ids: np.ndarray | None = None) -> None:
    """Raise NonFiniteActivations naming `path` and the first bad row (its number in the
    shard: `row_ids[r]` when given), if any value is NaN/inf."""
    if acts_TD.dtype == np.float16:  # exponent bits all set <=> inf or NaN; ~3x faster than isfinite
        bad_TD = (acts_TD.view(np.uint16) & 0x7C00) == 0x7C00
    else:
        bad_TD = ~np.isfinite(acts_TD)
    rows = np.flatnonzero(bad_TD.any(axis=1))
    if len(rows):
        r = int(rows[0])
        more = f" (and {len(rows) - 1} more rows)" if len(rows) > 1 else ""
        row = r if row_ids is None else int(row_ids[r])
        raise NonFiniteActivations(
            f"{path}: row {row} holds non-finite activations "
            f"({acts_TD[r][~np.isfinite(acts_TD[r].astype(np.float32))][:3].tolist()}, ...){more}. "
            "The model produced NaN/inf at the hook (e.g. fp16 overflow); fix the extraction "
            "(extract in float32, or another hook/model), delete the shard and rerun to re-extract it."
        )


class ShardStream:
    """Yields float32 [batch_size, d] tensors (raw units) on `device` for `total_tokens` tokens.

    `prefetch`: windows read ahead by a background thread, with a second one preparing
    the next batches (0: no threads). `cache_bytes`: when the shards' activations (fp16)
    fit in this many bytes they are kept on `device` and sampled there (0: never).
    Neither changes the batches.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        batch_size: int,
        total_tokens: int,
        seed: int = 0,
        buffer_shards: int = 2,
        device: torch.device | str = "cpu",
        prefetch: int = 1,
        cache_bytes: float = 0,
    ):
        if not paths:
            raise ValueError("no activation shards given")
        self.paths = list(paths)
        metas = [read_meta(p) for p in self.paths]
        self.excluded = [list(m.get("exclude_positions") or []) for m in metas]
        self.lengths = [_kept_rows(m) for m in metas]
        if not sum(self.lengths):
            raise ValueError(f"the {len(self.paths)} activation shards hold no tokens")
        self.d_in = metas[0].get("d_in")
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.batch_size = batch_size
        self.total_tokens = total_tokens
        self.buffer_shards = max(1, buffer_shards)
        self.seed = seed
        self.device = torch.device(device)
        self.prefetch = max(0, int(prefetch))
        self.cache_bytes = cache_bytes
        self.pin = self.device.type == "cuda"
        self._cache: torch.Tensor | None = None  # [sum(lengths), d] fp16 on device
        self.bytes_read = 0
        """Bytes of activations read from the shards so far (what a pack shares)."""

    def __len__(self) -> int:
        return self.total_tokens // self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.batches(0)

    @property
    def data_bytes(self) -> int | None:
        """Size of all shards' activations in fp16 (None when the metadata has no d_in)."""
        return None if self.d_in is None else 2 * sum(self.lengths) * int(self.d_in)

    @property
    def cached(self) -> bool:
        """True when every shard fits in `cache_bytes` and batches are sampled on the device."""
        return bool(self.cache_bytes) and self.data_bytes is not None and self.data_bytes <= self.cache_bytes

    def batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        """Batches number `start`, ..., len(self) - 1 (the same as a full pass would give)."""
        count = len(self) - start
        if count <= 0:
            return
        plan = self._plan(start * self.batch_size, count * self.batch_size)
        if self.cached:
            cache = self.load_cache()
            sources: Iterator[torch.Tensor] = (torch.from_numpy(self._window_sources(*w)).to(self.device) for w in plan)
            batches = self._assemble(sources, count, lambda idx: cache.index_select(0, idx).float())
        else:
            windows = _ahead((self._read_window(*w) for w in plan), self.prefetch, "ShardStream-windows")
            batches = self._assemble(windows, count, self._to_device)
        yield from _ahead(batches, BATCHES_AHEAD if self.prefetch else 0, "ShardStream-batches")

    def _to_device(self, rows: torch.Tensor) -> torch.Tensor:
        """A float32 batch on the device from fp16 rows (CPU: numpy's single-threaded
        conversion, which does not compete with the training's torch threads)."""
        if self.device.type == "cpu":
            return torch.from_numpy(rows.numpy().astype(np.float32))
        return rows.to(self.device, non_blocking=self.pin).float()

    def _assemble(
        self, windows: Iterator[torch.Tensor], count: int, to_batch: Callable[[torch.Tensor], torch.Tensor]
    ) -> Iterator[torch.Tensor]:
        """`count` batches of consecutive rows of the windows (rows, or cache indices)."""
        rows, i = None, 0
        for _ in range(count):
            parts: list[torch.Tensor] = []
            need = self.batch_size
            while need:
                if rows is None or i == len(rows):  # next window; copy the batch's head so the old one is freed
                    parts, rows = [p.clone() for p in parts], None
                    rows, i = next(windows), 0
                parts.append(rows[i : i + need])
                i, need = i + len(parts[-1]), need - len(parts[-1])
            yield to_batch(parts[0] if len(parts) == 1 else torch.cat(parts))

    def _plan(self, offset: int, n_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
        """(shards, permutation, first row, end row) of each window holding rows
        [offset, offset + n_rows) of the endless shuffled sequence; nothing is read here."""
        epoch, skip = divmod(offset, sum(self.lengths))
        while n_rows > 0:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))
            for w, first in enumerate(range(0, len(order), self.buffer_shards)):
                window = order[first : first + self.buffer_shards]
                n = sum(self.lengths[i] for i in window)
                if skip >= n:  # already trained on: not read
                    skip -= n
                    continue
                perm = np.random.default_rng([self.seed, epoch, w]).permutation(n)
                end = min(n, skip + n_rows)
                yield window, perm, skip, end
                n_rows -= end - skip
                skip = 0
                if n_rows <= 0:
                    return
            epoch += 1

    def _read_window(self, window: np.ndarray, perm: np.ndarray, first: int, end: int) -> torch.Tensor:
        """Rows [first, end) of the window's rows in the order `perm` (output row j = input
        row perm[j]), scattered into place shard by shard; page-locked on CUDA."""
        n = len(perm)
        dest = np.empty(n, np.int64)
        dest[perm] = np.arange(n)  # input row r goes to output row dest[r]
        rows: torch.Tensor | None = None
        at = 0
        for i in window:
            acts = self._read_acts(i)
            if rows is None:
                rows = torch.empty((n, acts.shape[1]), dtype=torch.from_numpy(acts[:0]).dtype, pin_memory=self.pin)
                rows_np = rows.numpy()
            rows_np[dest[at : at + len(acts)]] = acts
            at += len(acts)
        if rows is None:
            raise ValueError("a shuffle window holds no shard: the plan is empty (no training shards?)")
        return rows[first:end]

    def _window_sources(self, window: np.ndarray, perm: np.ndarray, first: int, end: int) -> np.ndarray:
        """Cache rows of the same rows as `_read_window` (cache row of input row perm[j])."""
        src = np.concatenate([np.arange(self.starts[i], self.starts[i] + self.lengths[i]) for i in window])
        return src[perm[first:end]]

    def _read_acts(self, i: int) -> np.ndarray:
        """Shard i's activations at the kept positions, checked against its metadata and for NaN/inf."""
        shard = read_shard(self.paths[i])
        acts, row_ids = shard.acts_TD, None
        if self.excluded[i]:
            row_ids = np.flatnonzero(keep_mask(shard.positions_T, self.excluded[i]))
            acts = acts[row_ids]
        if len(acts) != self.lengths[i]:
            raise ValueError(
                f"{self.paths[i]}: metadata says {self.lengths[i]} training rows but it "
                f"holds {len(acts)}; the shard is damaged, delete it to re-extract"
            )
        check_finite(acts, self.paths[i], row_ids)
        self.bytes_read += shard.acts_TD.nbytes
        return acts

    def load_cache(self) -> torch.Tensor:
        """Every shard's activations on the device, once (fp16, shard i at rows starts[i]:)."""
        if self._cache is None:
            if self.d_in is None:
                raise ValueError(f"shard metadata lacks d_in ({self.paths[0]}): regenerate the shards")
            cache = torch.empty((sum(self.lengths), int(self.d_in)), dtype=torch.float16, device=self.device)
            for i, start in enumerate(self.starts):
                cache[start : start + self.lengths[i]] = torch.from_numpy(self._read_acts(i)).to(self.device)
            self._cache = cache
        return self._cache


def _kept_rows(meta: dict) -> int:
    """Rows of a shard that are trained on: all but the `exclude_positions` of each sequence
    (the metadata's `kept_token_count` where the extraction wrote it)."""
    n = int(meta["token_count"])
    if not meta.get("exclude_positions"):
        return n
    if "kept_token_count" in meta:
        return int(meta["kept_token_count"])
    seq_len = int(meta["seq_len"])
    return n // seq_len * int(keep_mask(np.arange(seq_len), meta["exclude_positions"]).sum())


def _ahead(items: Iterator[T], depth: int, name: str = "ShardStream-prefetch") -> Iterator[T]:
    """The items of `items`, computed in a background thread up to `depth` items ahead.

    Same items in the same order; an exception raised while producing one is re-raised
    here when that item is due. Closing this generator stops the thread.
    """
    if depth <= 0:
        yield from items
        return
    done, slots, stop = object(), threading.Semaphore(depth), threading.Event()
    q: queue.SimpleQueue = queue.SimpleQueue()

    def produce() -> None:
        try:
            while True:
                while not slots.acquire(timeout=0.1):  # wait until the consumer takes one
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = next(items, done)
                q.put((item, None))
                if item is done:
                    return
        except BaseException as err:
            q.put((None, err))
        finally:  # stops an upstream _ahead's thread too
            getattr(items, "close", lambda: None)()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            slots.release()  # the producer may start on the next item while this one is used
            yield item
    finally:
        stop.set()
