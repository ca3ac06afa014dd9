"""The inspection network and its files: shapes, stride, save/load, corrupt checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import InspectionModel, default_model_path, load_model, save_model
from models.errors import InputError as UserError
from models.network import InspectionNet, NetConfig, context_margin_px, macs_per_pixel

SMALL = NetConfig(widths=(16, 16, 16), heads=2, head_hidden=4)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = InspectionNet(SMALL)
    return save_model(net, {"pixel_size_um": 2.0, "threshold": 0.3}, tmp_path / "m")


def test_output_shapes_and_stride(saved: Path) -> None:
    model = load_model(saved)
    assert model.output_stride == 4
    assert model.context_px == context_margin_px() and model.context_px % 16 == 0
    batch = np.zeros((3, 64, 96), np.float32)
    out = model.predict(batch)
    for key in ("anomaly", "roughness", "uncertainty", "roughness_sigma"):
        assert out[key].shape == (3, 16, 24) and out[key].dtype == np.float32
    assert ((out["anomaly"] >= 0) & (out["anomaly"] <= 1)).all()
    assert (out["roughness"] >= 0).all()
    assert ((out["uncertainty"] >= 0) & (out["uncertainty"] <= 1)).all()
    with pytest.raises(ValueError, match="multiples of 4"):
        model.predict(np.zeros((1, 30, 32), np.float32))


def test_output_does_not_depend_on_the_window_beyond_the_context(saved: Path) -> None:
    model = load_model(saved)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 512, 512)).astype(np.float32)
    full = model.predict(image)["anomaly"][0]
    c = model.context_px
    window = image[:, 64:448, 64:448]  # 384 px window; its centre is > context from its edge
    part = model.predict(window)["anomaly"][0]
    s = model.output_stride
    inner = slice(c // s, (384 - c) // s)
    ref = full[64 // s:448 // s, 64 // s:448 // s]
    np.testing.assert_allclose(part[inner, inner], ref[inner, inner], atol=2e-4)


def test_round_trip_gives_identical_predictions(saved: Path) -> None:
    torch.manual_seed(0)
    net = InspectionNet(SMALL).eval()
    x = np.random.default_rng(1).standard_normal((2, 64, 64)).astype(np.float32)
    with torch.inference_mode():
        ref = torch.sigmoid(net(torch.from_numpy(x)[:, None])["anomaly_logits"]).mean(1).numpy()
    model = load_model(saved)
    np.testing.assert_allclose(model.predict(x)["anomaly"], ref, atol=1e-5)
    card = json.loads(saved.with_suffix(".json").read_text())
    assert card["architecture"]["widths"] == [16, 16, 16]
    assert card["threshold"] == 0.3 and model.threshold == 0.3
    assert model.pixel_size_um == 2.0 and len(card["weights_sha256"]) == 64
    # the card and the weights can be named either way
    assert load_model(saved.with_suffix(".json")).threshold == 0.3
    assert load_model(saved.with_suffix("")).threshold == 0.3


def test_corrupt_or_missing_files_are_user_errors(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nothing.safetensors")
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])  # truncated weights
    with pytest.raises(UserError, match="m.safetensors"):
        load_model(saved)
    card_file = saved.with_suffix(".json")
    card = json.loads(card_file.read_text())
    card.pop("weights_sha256")
    card_file.write_text(json.dumps(card))
    with pytest.raises(UserError, match="weights_sha256: missing"):  # damage would go unseen
        load_model(saved)
    from models.modelfile import _weights_sha256

    card["weights_sha256"] = _weights_sha256(saved)  # the checksum of the truncated file
    card_file.write_text(json.dumps(card))
    with pytest.raises(UserError, match="corrupt model weights"):
        load_model(saved)
    saved.write_bytes(b"\x00" * 64)
    card["weights_sha256"] = _weights_sha256(saved)
    card_file.write_text(json.dumps(card))
    with pytest.raises(UserError, match="corrupt"):
        load_model(saved)
    card_file.write_text("{not json")
    with pytest.raises(UserError, match="m.json"):
        load_model(saved)


def test_weights_of_another_architecture_are_rejected(tmp_path: Path) -> None:
    path = save_model(InspectionNet(SMALL), {}, tmp_path / "a")
    card_file = path.with_suffix(".json")
    card = json.loads(card_file.read_text())
    card["architecture"]["widths"] = [32, 32, 32]  # the weights (and their checksum) kept
    card_file.write_text(json.dumps(card))
    with pytest.raises(UserError, match="architecture"):
        load_model(path)


def test_normalize_is_relative_to_the_brightness_level(saved: Path) -> None:
    model = load_model(saved)
    img = np.full((32, 32), 1000, np.uint16)
    img[:4, :4] = 1500
    x = model.normalize(img)
    assert x.dtype == np.float32
    assert x[10, 10] == pytest.approx(0.0) and x[0, 0] == pytest.approx(1.0)
    # 8-bit or 12-bit, the same scene gives the same input; a shared level is honoured
    np.testing.assert_allclose(model.normalize((img // 8).astype(np.uint8)), x, atol=0.02)
    assert model.normalize(img, level=500.0)[10, 10] == pytest.approx(2.0)
    rgb = np.stack([img, img, img], axis=-1)
    np.testing.assert_allclose(model.normalize(rgb), x, atol=1e-5)


def test_shipped_default_model_loads() -> None:
    from models.detector import PatchDetector
    from models.modelfile import network_model_path

    model = load_model(None)
    # the default is the one-class detector (under 50 MB), with the shipped network beside it
    assert isinstance(model, PatchDetector)
    assert default_model_path().stat().st_size < 50 * 1024 * 1024
    assert model.companion is not None
    assert set(model.card["thresholds_by_sample_kind"]) == {"wafer", "pv_cell", "rectangle"}
    # PV cells are calibrated per band of pixel sizes: the demo's 30 um takes the coarse band
    from models.card import card_of

    card = card_of(model)
    pv = model.card["thresholds_by_sample_kind"]["pv_cell"]
    coarse, source = card.threshold_for("pv_cell", 30.0, model.threshold)
    assert coarse < pv and "um pixels" in source
    assert card.threshold_for("pv_cell", 9.0, model.threshold)[0] > pv
    assert model.card["pixel_size_range_um"][0] <= model.pixel_size_um
    out = model.predict(np.zeros((1, 64, 64), np.float32))
    assert out["anomaly"].shape == (1, 16, 16)
    assert np.isfinite(out["roughness"]).all()
    network = load_model(network_model_path())
    assert isinstance(network, InspectionModel)
    assert network_model_path().stat().st_size < 20 * 1024 * 1024


def test_compute_budget() -> None:
    # a few thousand multiply-accumulates per input pixel at most (CPU throughput target)
    assert macs_per_pixel() < 2000


def test_uncertainty_is_the_entropy_of_the_mean_probability() -> None:
    from models.modelfile import predictive_entropy

    p = torch.tensor([1e-9, 0.1, 0.5, 0.9, 1 - 1e-9])
    h = predictive_entropy(p)
    assert h[2] == pytest.approx(1.0) and h[0] < 1e-4 and h[4] < 1e-4
    assert h[1] == pytest.approx(h[3]) and h[1] == pytest.approx(0.469, abs=1e-3)


def test_roughness_alone_equals_predict(saved: Path) -> None:
    """``predict_roughness`` (a detector's companion: no anomaly heads) gives the roughness
    maps of ``predict``, bit for bit."""
    model = load_model(saved)
    batch = np.random.default_rng(3).normal(0.0, 1.0, (2, 64, 96)).astype(np.float32)
    full = model.predict(batch)
    alone = model.predict_roughness(batch)
    assert set(alone) == {"roughness", "roughness_sigma"}
    for name in alone:
        assert alone[name].dtype == np.float32 and alone[name].shape == (2, 16, 24)
        np.testing.assert_array_equal(alone[name], full[name])
