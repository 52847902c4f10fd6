"""Expert-geometry figures (saepipe.plots.geometry) on tiny freshly initialised MoE SAEs."""

from __future__ import annotations

import struct

import pytest
import torch

pytest.importorskip("sklearn")

from saepipe.plots.geometry import encoder_features, plot_feature_geometry, plot_tsne
from saepipe.saes import build_sae, save_sae

D = 16


def _save(root, name, **cfg):
    sae = build_sae({"d_in": D, **cfg})
    if cfg["arch"] == "scale":
        with torch.no_grad():  # non-trivial feature scaling: effective encoder != raw W_enc
            sae.omega.copy_(torch.linspace(-0.5, 0.5, cfg["n_experts"]))
    return str(save_sae(sae, root / name))


@pytest.fixture(scope="module")
def saes(tmp_path_factory):
    root = tmp_path_factory.mktemp("geometry_saes")
    return {
        "switch": _save(root, "switch-n4", arch="switch", width=64, k=4, n_experts=4),
        "scale": _save(root, "scale-n4", arch="scale", width=64, k=4, n_experts=4, active_experts=2),
        "switch32": _save(root, "switch-n32", arch="switch", width=128, k=2, n_experts=32),
        "switch1": _save(root, "switch-n1", arch="switch", width=64, k=4, n_experts=1),
        "topk": _save(root, "topk", arch="topk", width=64, k=4),
    }


def _assert_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 400, (width, height)
    assert len(data) > min_bytes, len(data)
    assert data.rstrip().endswith(b"IEND\xaeB`\x82"), "truncated PNG"


def test_feature_geometry_png(saes, tmp_path):
    out = tmp_path / "sub" / "geometry.png"
    out.parent.mkdir()
    plot_feature_geometry([saes["switch"], saes["scale"], saes["switch32"]], str(out))
    _assert_png(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["geometry.png"]  # no temp left


def test_tsne_png(saes, tmp_path):
    for name, max_points in (("switch", 48), ("scale", 3000), ("switch32", 100)):
        out = tmp_path / f"tsne-{name}.png"
        plot_tsne(saes[name], str(out), max_points=max_points, seed=1)
        _assert_png(out)


def test_scale_uses_effective_encoder(saes):
    from saepipe.saes import load_sae

    sae = load_sae(saes["scale"])
    W_MD, label = encoder_features(sae)
    N, d, n = sae.W_enc.shape
    assert "effective" in label
    assert torch.allclose(W_MD, sae.W_hat().detach().permute(0, 2, 1).reshape(N * n, d))
    assert not torch.allclose(W_MD, sae.W_enc_DM().detach().T)


@pytest.mark.parametrize("key, match", [("topk", "not a mixture-of-experts SAE"), ("switch1", "at least 2 experts")])
def test_non_moe_rejected(saes, tmp_path, key, match):
    out = tmp_path / "x.png"
    with pytest.raises(ValueError, match=match):
        plot_feature_geometry([saes["switch"], saes[key]], str(out))
    with pytest.raises(ValueError, match=match):
        plot_tsne(saes[key], str(out))
    assert not out.exists()


def test_feature_geometry_row_count(saes, tmp_path):
    with pytest.raises(ValueError, match="1-4 SAE directories"):
        plot_feature_geometry([], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="1-4 SAE directories"):
        plot_feature_geometry([saes["switch"]] * 5, str(tmp_path / "x.png"))
