"""The training feed: prefetch and the device cache give exactly the streamed batches (at
any resume step), NaN/inf activations are refused naming shard and row, and the trainer's
precision / batch-size / cache options resolve and run."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

from saepipe.data.loader import NonFiniteActivations, ShardStream
from saepipe.data.shards import write_shard
from saepipe.train import TrainConfig, train_sae


def _shard(path, start, n, d=8, bad_row=None, **meta):
    """Row r holds the id start + r as (id // 1000, id % 1000) plus noise; exact in fp16.
    Sequences of 10 tokens (position = r % 10)."""
    rng = np.random.default_rng(start)
    acts = rng.standard_normal((n, d)).astype(np.float16)
    value = np.arange(start, start + n)
    acts[:, 0], acts[:, 1] = value // 1000, value % 1000
    if bad_row is not None:
        acts[bad_row, 3] = np.nan
    write_shard(
        path,
        acts,
        np.zeros(n, np.int32),
        np.arange(n, dtype=np.int32) % 10,
        {
            "model": "m",
            "hook": "h",
            "dtype": "float16",
            "d_in": d,
            "token_count": n,
            "mean_norm": float(np.sqrt(d)),
            "seq_len": 10,
            **meta,
        },
    )
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("feed")
    return [_shard(root / f"{i}.zarr", 1000 * i, n) for i, n in enumerate([700, 500, 900, 300, 600])]


def _ids(batch):
    return (batch[:, 0] * 1000 + batch[:, 1]).long().tolist()


@pytest.mark.parametrize("start", [0, 7, 31, 46])
def test_prefetch_and_device_cache_give_the_streamed_batches(shards, start):
    kw = dict(batch_size=64, total_tokens=47 * 64, seed=5, buffer_shards=2)  # about 1.1 epochs
    plain = list(ShardStream(shards, **kw, prefetch=0).batches(start))
    assert len(plain) == 47 - start
    ahead = ShardStream(shards, **kw, prefetch=2)
    cached = ShardStream(shards, **kw, cache_bytes=1e9)
    assert not ahead.cached and cached.cached
    for other in (list(ahead.batches(start)), list(cached.batches(start))):
        assert len(other) == len(plain)
        assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(plain, other))
    ids = [i for b in list(ShardStream(shards, **kw).batches(0))[:47] for i in _ids(b)]
    assert len(set(ids[:3000])) == 3000  # one epoch (3000 rows) without repeats


def test_cache_only_when_everything_fits(shards):
    data = 3000 * 8 * 2
    assert ShardStream(shards, 64, 640, cache_bytes=data).cached
    assert not ShardStream(shards, 64, 640, cache_bytes=data - 1).cached
    assert not ShardStream(shards, 64, 640).cached


def test_closing_the_stream_stops_the_prefetch_thread(shards):
    def prefetchers():
        return [t for t in threading.enumerate() if t.name.startswith("ShardStream-")]

    before = len(prefetchers())
    gen = ShardStream(shards, 64, 40 * 64, prefetch=1).batches(0)
    next(gen)
    assert len(prefetchers()) == before + 2  # the window and the batch thread
    gen.close()
    deadline = time.monotonic() + 10
    while len(prefetchers()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(prefetchers()) == before


@pytest.mark.parametrize("how", [dict(prefetch=0), dict(prefetch=1), dict(cache_bytes=1e9)])
def test_nan_row_is_refused_naming_shard_and_row(tmp_path, how):
    paths = [_shard(tmp_path / "good.zarr", 0, 300), _shard(tmp_path / "bad.zarr", 1000, 300, bad_row=123)]
    stream = ShardStream(paths, 50, 600, seed=0, buffer_shards=1, **how)
    with pytest.raises(NonFiniteActivations, match=r"bad\.zarr: row 123 holds non-finite"):
        list(stream)


def test_excluded_positions_are_not_trained_on(tmp_path):
    """exclude_positions [0, 3]: 8 of every 10 rows; a NaN at an excluded row is harmless,
    one at a kept row is named by its row in the shard."""
    paths = [
        _shard(tmp_path / f"{i}.zarr", 1000 * i, 300, bad_row=130 if i else None, exclude_positions=[0, 3])
        for i in range(3)
    ]
    stream = ShardStream(paths, 40, 3 * 240, seed=1, buffer_shards=2, prefetch=1)
    assert stream.lengths == [240] * 3
    ids = [i for b in stream for i in _ids(b)]
    assert sorted(ids) == [1000 * s + r for s in range(3) for r in range(300) if r % 10 not in (0, 3)]
    assert all(
        torch.equal(a, b)
        for a, b in zip(ShardStream(paths, 40, 720, seed=1, buffer_shards=2).batches(9), list(stream)[9:], strict=True)
    )
    paths[1] = _shard(tmp_path / "bad.zarr", 1000, 300, bad_row=131, exclude_positions=[0, 3])
    with pytest.raises(NonFiniteActivations, match=r"bad\.zarr: row 131 holds"):
        list(ShardStream(paths, 40, 720, seed=1, buffer_shards=2))


def test_training_refuses_a_shard_with_a_nan_row(tmp_path, one_thread):
    paths = [_shard(tmp_path / "a.zarr", 0, 256), _shard(tmp_path / "b.zarr", 1000, 256, bad_row=7)]
    cfg = TrainConfig(tokens=512, batch_size=64, device="cpu", checkpoint_every_s=1e9)
    with pytest.raises(NonFiniteActivations, match=r"b\.zarr: row 7 holds non-finite.*re-extract"):
        train_sae({"arch": "topk", "width": 32, "k": 4}, cfg, paths, tmp_path / "out")
    assert not (tmp_path / "out" / "sae.safetensors").exists()


def test_auto_fields_resolve_per_device_and_bad_values_are_named():
    cpu = TrainConfig().resolved(torch.device("cpu"))
    assert (cpu.batch_size, cpu.precision, cpu.device_cache_gb) == (1024, "fp32", 0.0)
    assert TrainConfig(batch_size=512, precision="bf16").resolved(torch.device("cpu")).batch_size == 512
    with pytest.raises(ValueError, match=r"train.precision must be one of .*'fp16'"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match=r"train.batch_size must be a positive int or 'auto', got 'big'"):
        TrainConfig(batch_size="big")
    with pytest.raises(ValueError, match=r"train.device_cache_gb must be a number >= 0"):
        TrainConfig(device_cache_gb=-1)


@pytest.mark.parametrize(
    "sae",
    [
        {"arch": "topk", "width": 64, "k": 4},
        {"arch": "switch", "width": 64, "k": 4, "n_experts": 4},
        {"arch": "scale", "width": 64, "k": 4, "n_experts": 4, "active_experts": 2},
    ],
)
def test_bf16_autocast_and_device_cache_train(shards, tmp_path, sae, one_thread):
    """bf16 autocast (the GPU default) on the CPU: trains, weights stay float32; the device
    cache trains on exactly the streamed batches (bitwise equal to streaming in fp32)."""
    base = dict(
        tokens=30 * 64, batch_size=64, lr=1e-3, warmup_steps=3, log_every=10, device="cpu", checkpoint_every_s=1e9
    )
    from safetensors.torch import load_file

    fp32 = train_sae(sae, TrainConfig(**base, prefetch_windows=0), shards, tmp_path / "stream")
    train_sae(sae, TrainConfig(**base, device_cache_gb=1.0), shards, tmp_path / "cache")
    a, b = (load_file(str(tmp_path / d / "sae.safetensors")) for d in ("stream", "cache"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    bf16 = train_sae(sae, TrainConfig(**base, precision="bf16"), shards, tmp_path / "bf16")
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05) and bf16["loss"] != fp32["loss"]
    run = json.loads((tmp_path / "bf16/config.json").read_text())["run"]["train"]
    assert run["precision"] == "bf16" and run["batch_size"] == 64
    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "bf16/sae.safetensors")).values())
