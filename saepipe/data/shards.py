"""Activation shards: one Zarr v3 group per shard, written whole and atomically.

Layout of `<split>/<index>.zarr`:
    acts       float16 [T, d]   activations at the hook (uncompressed, crc32c-checked chunks)
    tokens     int32   [T]      token id at each position
    positions  int32   [T]      position of the token in its sequence
    zarr.json  attributes: the shard's metadata (model, hook, dtype, token_count, mean_norm,
               d_in, seq_len, split, index, ...)
fp16 activations barely compress, so chunks are stored raw; each inner chunk is >= 1 MB
and a whole shard is read with one slice per array (SPEC §4).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from saepipe.io import atomic_path

CHUNK_BYTES = 4 << 20  # inner chunk size target


@dataclass
class Shard:
    acts_TD: np.ndarray
    tokens_T: np.ndarray
    positions_T: np.ndarray
    meta: dict


def _array(group, name: str, data: np.ndarray) -> None:
    row_bytes = data.dtype.itemsize * int(np.prod(data.shape[1:], dtype=np.int64))
    rows = max(1, min(len(data), CHUNK_BYTES // max(row_bytes, 1)))
    arr = group.create_array(
        name, shape=data.shape, dtype=data.dtype, chunks=(rows, *data.shape[1:]),
        serializer=BytesCodec(), compressors=[Crc32cCodec()],
    )
    arr[...] = data


def write_shard(path: str | os.PathLike, acts_TD: np.ndarray, tokens_T: np.ndarray,
                positions_T: np.ndarray, meta: dict) -> None:
    """Write one shard atomically (a killed job leaves only a hidden temp directory)."""
    if not (len(acts_TD) == len(tokens_T) == len(positions_T)):
        raise ValueError("acts, tokens and positions must have the same number of rows")
    with atomic_path(path, is_dir=True) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        _array(group, "acts", np.ascontiguousarray(acts_TD, dtype=np.float16))
        _array(group, "tokens", np.ascontiguousarray(tokens_T, dtype=np.int32))
        _array(group, "positions", np.ascontiguousarray(positions_T, dtype=np.int32))
        group.attrs.update(meta)


def read_meta(path: str | os.PathLike) -> dict:
    return dict(zarr.open_group(str(path), mode="r").attrs)


def read_shard(path: str | os.PathLike, with_acts: bool = True) -> Shard:
    """Read a whole shard into memory (one shard: tens of MB by design)."""
    group = zarr.open_group(str(path), mode="r")
    return Shard(
        acts_TD=group["acts"][...] if with_acts else np.empty((0, 0), np.float16),
        tokens_T=group["tokens"][...],
        positions_T=group["positions"][...],
        meta=dict(group.attrs),
    )


def check_compatible(metas: list[dict], paths: list[str | os.PathLike]) -> dict:
    """All shards must come from one model, hook, dtype and width; returns the first meta."""
    keys = ("model", "hook", "dtype", "d_in")
    first = metas[0]
    for meta, path in zip(metas, paths):
        diff = {k: (first.get(k), meta.get(k)) for k in keys if meta.get(k) != first.get(k)}
        if diff:
            raise ValueError(
                f"shard {path} does not match {paths[0]}: "
                + ", ".join(f"{k} {a!r} != {b!r}" for k, (a, b) in diff.items())
                + ". Regenerate the stale shards (snakemake --forcerun extract)."
            )
    return first


def mean_norm(metas: list[dict]) -> float:
    """Token-weighted mean L2 norm of the activations over several shards."""
    tokens = sum(m["token_count"] for m in metas)
    return sum(m["mean_norm"] * m["token_count"] for m in metas) / tokens


def shard_paths(directory: str | os.PathLike) -> list[Path]:
    return sorted(Path(directory).glob("*.zarr"))
