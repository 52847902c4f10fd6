"""Damaged and mismatched activation shards are refused with the shard's name and the fix."""

from __future__ import annotations

import re

import numpy as np
import pytest
import zarr

from saepipe.data.shards import ShardError, check_compatible, read_meta, read_shard, verify_shard, write_shard

N, D = 40_000, 64  # acts: 5 MB in two chunks (4 MB target), so one chunk can be damaged alone


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "results" / "activations" / "train" / "000.zarr"
    rng = np.random.default_rng(0)
    write_shard(
        path,
        rng.standard_normal((N, D)).astype(np.float16),
        np.arange(N, dtype=np.int32),
        np.zeros(N, np.int32),  # all zero = the fill value: its chunk must still be written
        {
            "model": "m@1",
            "hook": "blocks.1.hook_resid_pre",
            "dtype": "float16",
            "d_in": D,
            "token_count": N,
            "mean_norm": 8.0,
        },
    )
    return path


def _chunk(shard, name="acts"):
    files = sorted(p for p in (shard / name / "c").rglob("*") if p.is_file())
    assert len(files) == (2 if name == "acts" else 1)
    return files[-1]


def _refused(shard, match: str):
    with pytest.raises(ShardError) as err:
        read_shard(shard)
    msg = str(err.value)
    assert str(shard) in msg and f"snakemake --forcerun {shard}" in msg
    assert re.search(match, msg), msg


def test_intact_shard_reads_and_verifies(shard):
    meta = verify_shard(shard)
    assert meta["token_count"] == N
    assert read_shard(shard).acts_TD.shape == (N, D)


def test_flipped_byte_in_a_chunk_is_detected(shard):
    chunk = _chunk(shard)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    _refused(shard, r"acts.*checksum")


def test_truncated_chunk_is_detected(shard):
    chunk = _chunk(shard)
    chunk.write_bytes(chunk.read_bytes()[:1000])
    _refused(shard, r"acts.*(checksum|truncated)")


def test_deleted_chunk_is_detected_even_one_holding_the_fill_value(shard):
    _chunk(shard, "acts").unlink()
    _refused(shard, r"acts has 1 of its 2 chunk files missing")
    assert read_shard(shard, with_acts=False).tokens_T.shape == (N,)  # acts not read: fine
    _chunk(shard, "positions").unlink()
    with pytest.raises(ShardError, match="positions has 1 of its 1 chunk files missing"):
        read_shard(shard, with_acts=False)


def test_damaged_metadata_and_missing_shard(shard, tmp_path):
    (shard / "zarr.json").write_text("{ not json")
    with pytest.raises(ShardError, match=r"metadata cannot be read.*snakemake --forcerun"):
        read_meta(shard)
    with pytest.raises(FileNotFoundError, match="snakemake --forcerun"):
        read_shard(tmp_path / "nope.zarr")


def test_row_count_disagreeing_with_metadata(shard):
    zarr.open_group(str(shard), mode="r+").attrs["token_count"] = N + 1
    _refused(shard, f"acts has {N} rows but the metadata says token_count={N + 1}")


@pytest.mark.parametrize(
    "key,value", [("model", "gpt2@abc"), ("hook", "blocks.8.hook_resid_pre"), ("dtype", "bfloat16"), ("d_in", 768)]
)
def test_shard_from_another_model_hook_or_dtype_is_refused(shard, tmp_path, key, value):
    other = tmp_path / "results" / "activations" / "train" / "001.zarr"
    write_shard(
        other,
        np.zeros((10, D), np.float16),
        np.zeros(10, np.int32),
        np.zeros(10, np.int32),
        {**read_meta(shard), "token_count": 10, key: value},
    )
    with pytest.raises(ShardError) as err:
        check_compatible([read_meta(shard), read_meta(other)], [shard, other])
    msg = str(err.value)
    assert f"{key} {value!r} (expected {read_meta(shard)[key]!r})" in msg
    assert f"snakemake --forcerun {other}" in msg and f"--forcerun {shard}" not in msg


def test_metadata_without_the_identity_keys_is_refused(shard, tmp_path):
    other = tmp_path / "x.zarr"
    write_shard(
        other, np.zeros((10, D), np.float16), np.zeros(10, np.int32), np.zeros(10, np.int32), {"token_count": 10}
    )
    with pytest.raises(ShardError, match=r"no 'model' in their metadata.*--forcerun .*x\.zarr"):
        check_compatible([read_meta(shard), read_meta(other)], [shard, other])


@pytest.fixture
def native_model_and_corpus(tmp_path):
    """A tiny random native model directory and a random-token corpus directory."""
    import json

    from saepipe.lm import LMConfig, build_native, save_native

    model, arch = build_native(LMConfig(d_model=16, n_layers=2, n_heads=2, d_mlp=32), vocab_size=50, n_ctx=16)
    save_native(model, tmp_path / "lm", {"kind": "native", "arch": arch})
    (tmp_path / "corpus").mkdir()
    np.save(tmp_path / "corpus" / "train.npy", np.random.default_rng(0).integers(0, 50, (64, 16), dtype=np.int32))
    (tmp_path / "corpus" / "corpus.json").write_text(json.dumps({"seq_len": 16, "prepend_bos": True}))
    return tmp_path / "lm", tmp_path / "corpus"


def test_extraction_refuses_to_start_without_disk_space(native_model_and_corpus, tmp_path, monkeypatch, capsys):
    import shutil

    from saepipe.extract import ExtractConfig, extract_shard

    cfg = ExtractConfig(hook="blocks.1.hook_resid_pre", train_tokens=1024, shard_tokens=512, batch_size=8)
    free = shutil.disk_usage(tmp_path)._replace(free=10_000)
    monkeypatch.setattr("saepipe.extract.shutil.disk_usage", lambda path: free)
    out = tmp_path / "results" / "activations" / "train" / "000.zarr"
    with pytest.raises(
        OSError, match=r"not enough disk for shard .*000\.zarr: it needs 0\.00 GB but .* has 0\.00 GB free"
    ):
        extract_shard(cfg, *native_model_and_corpus, "train", 0, out)
    assert not out.exists()
    # the estimate: 1024 tokens x (16 x 2 + 8) B for the split, half of it for this shard
    assert f"-> {1024 * 40 / 1e9:.2f} GB in 2 shards; this shard {512 * 40 / 1e9:.3f} GB" in capsys.readouterr().err


def test_excluded_positions_are_recorded_and_left_out_of_the_norm(native_model_and_corpus, tmp_path):
    from saepipe.data.shards import keep_mask
    from saepipe.extract import ExtractConfig, extract_shard

    cfg = ExtractConfig(
        hook="blocks.1.hook_resid_pre", train_tokens=512, shard_tokens=512, batch_size=8, exclude_positions=[0]
    )
    meta = extract_shard(cfg, *native_model_and_corpus, "train", 0, tmp_path / "s.zarr")
    shard = read_shard(tmp_path / "s.zarr")
    assert meta["exclude_positions"] == [0] and meta["prepend_bos"] is True
    assert len(shard.acts_TD) == 512  # every position stored (CE, MaxAct)
    keep = keep_mask(shard.positions_T, meta["exclude_positions"])
    assert keep.sum() == 512 - 32 == meta["kept_token_count"] and not keep[shard.positions_T == 0].any()
    np.testing.assert_array_equal(shard.kept_acts(), shard.acts_TD[keep])
    norms = np.linalg.norm(shard.acts_TD.astype(np.float32), axis=1)
    assert meta["mean_norm"] == pytest.approx(norms[keep].mean(), rel=1e-3)
    assert meta["mean_norm"] != pytest.approx(norms.mean(), rel=1e-3)
