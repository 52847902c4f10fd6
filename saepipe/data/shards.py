"""Activation shards: one Zarr v3 group per shard, written whole and atomically.

Layout of `<split>/<index>.zarr`:
    acts       float16 [T, d]   activations at the hook (uncompressed, crc32c-checked chunks)
    tokens     int32   [T]      token id at each position
    positions  int32   [T]      position of the token in its sequence
    zarr.json  attributes: the shard's metadata (model, hook, dtype, token_count, mean_norm,
               d_in, seq_len, split, index, ...)
fp16 activations barely compress, so chunks are stored raw; each inner chunk is >= 1 MB
and a whole shard is read with one slice per array (docs/reference.md §4).

Integrity: every chunk carries a crc32c checksum and every chunk file is written (even one
equal to the fill value), so a flipped byte, a truncated chunk and a deleted chunk are all
detected when the shard is read (`ShardError`, naming the shard and the command that
regenerates it), as are unreadable metadata and a row count that disagrees with it.
Shards of another model, hook, dtype or width are refused by `check_compatible`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from saepipe.io import atomic_path

CHUNK_BYTES = 4 << 20  # inner chunk size target
ARRAYS = ("acts", "tokens", "positions")
CRC32C_RESIDUE = 0x48674BC7  # CRC-32C of any message followed by its own CRC (little-endian)


class ShardError(ValueError):
    """A shard that cannot be trusted: damaged, incomplete or from another run."""


def regenerate_hint(paths) -> str:
    """The command that rebuilds the given shards (paths as the pipeline names them)."""
    return "snakemake --forcerun " + " ".join(str(p) for p in paths)


def _damaged(path, what: str, err: Exception | None = None) -> ShardError:
    cause = f" ({type(err).__name__}: {err})" if err is not None else ""
    return ShardError(
        f"activation shard {path} is damaged: {what}{cause}. Regenerate it with: {regenerate_hint([path])}"
    )


@dataclass
class Shard:
    acts_TD: np.ndarray
    tokens_T: np.ndarray
    positions_T: np.ndarray
    meta: dict

    def kept_acts(self) -> np.ndarray:
        """The activations of the rows whose position is not in the metadata's
        `exclude_positions` (what SAE training and reconstruction statistics should see;
        `kept_token_count` rows). Without exclusions: `acts_TD` itself, no copy."""
        excluded = self.meta.get("exclude_positions") or []
        return self.acts_TD[keep_mask(self.positions_T, excluded)] if excluded else self.acts_TD

    def kept_sequence_ids(self) -> np.ndarray:
        """The sequence (0, 1, ... within this shard) of each row of `kept_acts()`: a new
        sequence starts at every position 0 (counted before the exclusions)."""
        seq_T = np.cumsum(self.positions_T == 0) - 1
        excluded = self.meta.get("exclude_positions") or []
        return seq_T[keep_mask(self.positions_T, excluded)] if excluded else seq_T


def _array(group, name: str, data: np.ndarray) -> None:
    row_bytes = data.dtype.itemsize * int(np.prod(data.shape[1:], dtype=np.int64))
    rows = max(1, min(len(data), CHUNK_BYTES // max(row_bytes, 1)))
    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=(rows, *data.shape[1:]),
        serializer=BytesCodec(),
        compressors=[Crc32cCodec()],
        config={"write_empty_chunks": True},  # a missing chunk file then always means damage
    )
    arr[...] = data


def write_shard(
    path: str | os.PathLike, acts_TD: np.ndarray, tokens_T: np.ndarray, positions_T: np.ndarray, meta: dict
) -> None:
    """Write one shard atomically (a killed job leaves only a hidden temp directory)."""
    if not (len(acts_TD) == len(tokens_T) == len(positions_T)):
        raise ValueError("acts, tokens and positions must have the same number of rows")
    with atomic_path(path, is_dir=True) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        _array(group, "acts", np.ascontiguousarray(acts_TD, dtype=np.float16))
        _array(group, "tokens", np.ascontiguousarray(tokens_T, dtype=np.int32))
        _array(group, "positions", np.ascontiguousarray(positions_T, dtype=np.int32))
        group.attrs.update(meta)


def _open(path) -> zarr.Group:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"activation shard {path} does not exist; build it with: {regenerate_hint([path])}")
    try:
        group = zarr.open_group(str(path), mode="r")
        missing = [name for name in ARRAYS if name not in group]
    except Exception as err:  # unreadable or invalid zarr.json
        raise _damaged(path, "its Zarr metadata cannot be read", err) from err
    if missing:
        raise _damaged(path, f"array(s) {missing} are missing")
    return group


def read_meta(path: str | os.PathLike) -> dict:
    """The shard's metadata (its group attributes); `ShardError` if the shard is unreadable."""
    return dict(_open(path).attrs)


def _direct_layout(arr) -> bool:
    """True for the layout `write_shard` makes (raw little-endian bytes + crc32c, regular row
    chunks, "/" chunk keys), which `_read_direct` reads without zarr's per-chunk pipeline."""
    m = arr.metadata
    return (
        len(m.codecs) == 2
        and isinstance(m.codecs[0], BytesCodec)
        and isinstance(m.codecs[1], Crc32cCodec)
        and getattr(m.codecs[0].endian, "value", None) in ("little", None)
        and sys.byteorder == "little"
        and getattr(m.chunk_key_encoding, "separator", None) == "/"
        and tuple(m.chunk_grid.chunk_shape[1:]) == tuple(arr.shape[1:])
    )


def _read_direct(path, arr, name: str) -> np.ndarray:
    """The whole array from its chunk files: each is the chunk's C-order bytes (edge chunks
    padded to the full chunk) followed by the little-endian crc32c of those bytes."""
    import google_crc32c

    rows = arr.metadata.chunk_grid.chunk_shape[0]
    out = np.empty(arr.shape, arr.dtype)
    chunk_bytes = rows * out[:1].nbytes if len(out) else 0
    flat = out.reshape(len(out), -1).view(np.uint8).reshape(-1) if out.size else out.view(np.uint8)
    suffix = "/0" * (arr.ndim - 1)
    for i in range(arr.nchunks):
        data = (Path(path) / name / "c" / f"{i}{suffix}").read_bytes()
        if len(data) != chunk_bytes + 4:
            raise _damaged(path, f"chunk {i} of {name} is truncated ({len(data)} of {chunk_bytes + 4} bytes)")
        # the CRC of bytes followed by their own little-endian CRC-32C is a constant: one
        # pass over the chunk, no copy of its payload
        if google_crc32c.value(data) != CRC32C_RESIDUE:
            raise _damaged(path, f"chunk {i} of {name} fails its crc32c checksum")
        start = i * chunk_bytes
        take = min(chunk_bytes, flat.nbytes - start)
        flat[start : start + take] = np.frombuffer(data, np.uint8, take)
    return out


def _read_array(path, group, name: str) -> np.ndarray:
    arr = group[name]
    if arr.nchunks_initialized != arr.nchunks:
        raise _damaged(
            path, f"{name} has {arr.nchunks - arr.nchunks_initialized} of its {arr.nchunks} chunk files missing"
        )
    if _direct_layout(arr):
        data = _read_direct(path, arr, name)
    else:
        try:
            data = arr[...]
        except Exception as err:  # crc32c mismatch, truncated chunk, undecodable bytes
            raise _damaged(path, f"a chunk of {name} fails its checksum or is truncated", err) from err
    expected = group.attrs.get("token_count")
    if expected is not None and len(data) != expected:
        raise _damaged(path, f"{name} has {len(data)} rows but the metadata says token_count={expected}")
    return data


def read_shard(path: str | os.PathLike, with_acts: bool = True) -> Shard:
    """Read a whole shard into memory (one shard: tens of MB by design), checking every chunk."""
    group = _open(path)
    return Shard(
        acts_TD=_read_array(path, group, "acts") if with_acts else np.empty((0, 0), np.float16),
        tokens_T=_read_array(path, group, "tokens"),
        positions_T=_read_array(path, group, "positions"),
        meta=dict(group.attrs),
    )


def verify_shard(path: str | os.PathLike) -> dict:
    """Read every chunk of a shard (checksums, completeness, row counts); returns its metadata."""
    return read_shard(path).meta


COMPATIBILITY_KEYS = ("model", "hook", "dtype", "d_in")


def check_compatible(metas: Sequence[dict], paths: Sequence[str | os.PathLike]) -> dict:
    """All shards must come from one model, hook, dtype and width (`COMPATIBILITY_KEYS`);
    returns the first meta. Called by training, evaluation and MaxAct on their shards."""
    first = metas[0]
    for key in COMPATIBILITY_KEYS:
        if any(key not in meta for meta in metas):
            bad = [str(p) for p, m in zip(paths, metas) if key not in m]
            raise ShardError(
                f"shard(s) {', '.join(bad)} have no {key!r} in their metadata (not written "
                f"by saepipe's extract stage); rebuild them with: {regenerate_hint(bad)}"
            )
    stale = [(path, meta) for path, meta in zip(paths, metas) if any(meta[k] != first[k] for k in COMPATIBILITY_KEYS)]
    if stale:
        path, meta = stale[0]
        diff = ", ".join(f"{k} {meta[k]!r} (expected {first[k]!r})" for k in COMPATIBILITY_KEYS if meta[k] != first[k])
        raise ShardError(
            f"shard {path} does not match {paths[0]}: {diff}; {len(stale)} of {len(paths)} shards "
            "differ. They come from another model, hook or dtype (an older run?). Delete or "
            f"regenerate the stale shards: {regenerate_hint(p for p, _ in stale)}"
        )
    return first


def keep_mask(positions: np.ndarray, exclude_positions) -> np.ndarray:
    """Boolean mask of the rows whose sequence position is not in `exclude_positions`
    (the shard metadata's `exclude_positions`, e.g. GPT-2's BOS position 0)."""
    return ~np.isin(np.asarray(positions), np.asarray(list(exclude_positions or []), dtype=np.int64))


def mean_norm(metas: list[dict]) -> float:
    """Token-weighted mean L2 norm of the activations over several shards."""
    tokens = sum(m["token_count"] for m in metas)
    return sum(m["mean_norm"] * m["token_count"] for m in metas) / tokens


def shard_paths(directory: str | os.PathLike) -> list[Path]:
    return sorted(Path(directory).glob("*.zarr"))
