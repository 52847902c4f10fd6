"""Corpus, shards and the streaming loader."""

from __future__ import annotations

import numpy as np
import pytest

from saepipe.data.corpus import CorpusConfig, build_corpus, is_eval_doc
from saepipe.data.loader import ShardStream
from saepipe.data.shards import check_compatible, read_shard, write_shard
from saepipe.extract import ExtractConfig, shard_sequences


def _shard(path, start, n=1000, d=8, **meta):
    """Row r of the shard holds (start + r) as (value // 1000, value % 1000): exact in fp16."""
    value = np.arange(start, start + n)
    acts = np.zeros((n, d), np.float16)
    acts[:, 0], acts[:, 1] = value // 1000, value % 1000
    write_shard(
        path,
        acts,
        np.arange(n, dtype=np.int32),
        np.arange(n, dtype=np.int32) % 10,
        {"model": "m", "hook": "h", "dtype": "float16", "d_in": d, "token_count": n, "mean_norm": 1.0, **meta},
    )
    return path


def test_shard_round_trip(tmp_path):
    path = _shard(tmp_path / "a.zarr", 0)
    shard = read_shard(path)
    assert shard.acts_TD.shape == (1000, 8) and shard.acts_TD.dtype == np.float16
    assert shard.acts_TD[17, 1] == 17 and shard.positions_T[17] == 7
    assert shard.meta["hook"] == "h"


def test_failed_write_leaves_no_shard(tmp_path):
    with pytest.raises(ValueError):
        write_shard(tmp_path / "bad.zarr", np.zeros((10, 4)), np.zeros(9), np.zeros(10), {})
    assert list(tmp_path.iterdir()) == []


def test_mixed_shards_are_refused(tmp_path):
    a = _shard(tmp_path / "a.zarr", 0)
    b = _shard(tmp_path / "b.zarr", 0, hook="other")
    from saepipe.data.shards import read_meta

    with pytest.raises(ValueError, match="hook"):
        check_compatible([read_meta(a), read_meta(b)], [a, b])


def _ids(batch):
    return (batch[:, 0] * 1000 + batch[:, 1]).long().numpy()


def test_stream_covers_every_row_shuffled_and_bounded(tmp_path):
    paths = [_shard(tmp_path / f"{i}.zarr", i * 1000) for i in range(4)]
    stream = ShardStream(paths, batch_size=100, total_tokens=4000, seed=0)
    rows = np.concatenate([_ids(b) for b in stream])
    assert len(rows) == 4000
    assert sorted(rows.tolist()) == list(range(4000))  # one full epoch, no repeats
    assert not np.array_equal(rows, np.sort(rows))  # shuffled
    first = np.concatenate([_ids(b) for b in ShardStream(paths, 100, 1000, seed=0)])
    assert len({int(v) // 1000 for v in first}) > 1  # batches mix shards
    more = list(ShardStream(paths, batch_size=100, total_tokens=10_000, seed=1))
    assert len(more) == 100  # several epochs when asked


def test_corpus_split_is_deterministic_by_content():
    docs = [f"document number {i}" for i in range(2000)]
    flags = [is_eval_doc(t, 0.1, 0) for t in docs]
    assert flags == [is_eval_doc(t, 0.1, 0) for t in docs]
    assert 0.07 < np.mean(flags) < 0.13


def test_corpus_too_small_names_both_numbers(tmp_path):
    cfg = CorpusConfig(packages=[], vocab_size=300, min_tokens=10**12)
    with pytest.raises(ValueError, match=r"train tokens but corpus.min_tokens asks for 1,000,000,000,000"):
        build_corpus(cfg, tmp_path)
    assert not (tmp_path / "train.npy").exists()


def test_extraction_request_larger_than_corpus():
    cfg = ExtractConfig(train_tokens=10_000, shard_tokens=1280)
    with pytest.raises(ValueError, match=r"asks for 10,048 tokens .* has only 6,400"):
        shard_sequences(cfg, "train", 0, seq_len=64, available=100)
    rows = shard_sequences(cfg, "train", 7, seq_len=64, available=1000)
    assert (rows.start, rows.stop) == (140, 157)
