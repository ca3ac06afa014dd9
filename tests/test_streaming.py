"""Mosaic inference in memory bounded in width: the same maps, bit for bit, as the row buffer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import ndimage
from shapely.geometry import Point

from models import InspectionModel
from models.network import InspectionNet
from scanner.inspection.maps import infer_mosaic
from scanner.inspection.polygonmask import polygon_mask
from scanner.inspection.tiled import MAPS, GridReader, ZarrSink, plan_tiling, run_tiled
from scanner.ngff import build_pyramid, create_multiscale, finish_multiscale, open_mosaic


@pytest.fixture(scope="module")
def net_model() -> InspectionModel:
    torch.manual_seed(0)
    return InspectionModel(InspectionNet(), {"pixel_size_um": 1.0, "threshold": 0.5})


def _mosaic(path, shape, seed=0):
    rng = np.random.default_rng(seed)
    img = (ndimage.gaussian_filter(rng.random(shape), 2.0) * 3000 + 1000).astype(np.uint16)
    img[:, -150:] = 0  # an unscanned strip: its windows are not computed
    tmp, arrays = create_multiscale(path, img.shape, chunk=128, dtype=img.dtype)
    arrays[0][:] = img
    build_pyramid(arrays, 128)
    finish_multiscale(tmp, path, len(arrays), 1.0, (0.0, 0.0), "mosaic")


@pytest.mark.parametrize("masked", [False, True])
def test_streamed_maps_equal_the_row_buffer(net_model, tmp_path, masked):
    mosaic = tmp_path / "mosaic.ome.zarr"
    _mosaic(mosaic, (700, 1000))
    poly = Point(500, 350).buffer(420) if masked else None
    maps = infer_mosaic(net_model, mosaic, tmp_path / "new", polygon=poly, edge_um=0,
                        core_px=192)
    assert not (tmp_path / "new" / "inspect-windows.tmp.zarr").exists()

    level0 = open_mosaic(mosaic)[0][0]
    reader = GridReader(level0, 1.0)
    tiling = plan_tiling(reader.shape, 4, int(net_model.context_px), core_px=192)
    ref = {}
    for name in MAPS:
        _, arrays = create_multiscale(tmp_path / f"ref_{name}.zarr", tiling.map_shape,
                                      chunk=tiling.step, dtype=np.float32)
        ref[name] = arrays[0]
    mask = polygon_mask(poly, maps.origin_um, maps.pixel_size_um, 0) if masked else None
    # the unscanned strip is not inspected in either (scanner.inspection.maps.scanned_mask)
    from scanner.inspection.maps import scanned_mask

    mask = scanned_mask(open_mosaic(mosaic)[0], 4, mask)
    stats = run_tiled(net_model, reader, ZarrSink(ref), tiling=tiling, mask=mask,
                      skip_empty=True, level=maps.stats.extra["level"])
    assert tiling.grid[0] * tiling.grid[1] > 9  # blends across rows and columns
    assert (maps.stats.windows, maps.stats.skipped) == (stats.windows, stats.skipped)
    assert stats.skipped > 0
    for name in MAPS:
        np.testing.assert_array_equal(np.asarray(maps.maps[name]), ref[name][:])


def test_a_calibrated_border_band_is_divided_by_its_factor_and_nothing_else(net_model,
                                                                          tmp_path):
    # a card whose border band scored 1.6 x its inside (models.edgeband): the anomaly map
    # within 64 model px of the usable area's border is divided by 1.6, the rest unchanged
    mosaic = tmp_path / "mosaic.ome.zarr"
    _mosaic(mosaic, (700, 1000))
    poly = Point(450, 350).buffer(330)
    edged = copy.copy(net_model)
    edged.card = {**net_model.card, "calibration": {"edge": {"band_px": 64, "factor": 1.6}}}
    plain = infer_mosaic(net_model, mosaic, tmp_path / "plain", polygon=poly, edge_um=0,
                         core_px=192)
    banded = infer_mosaic(edged, mosaic, tmp_path / "banded", polygon=poly, edge_um=0,
                          core_px=192)
    a, b = np.asarray(plain.maps["anomaly"][:]), np.asarray(banded.maps["anomaly"][:])
    inner = polygon_mask(poly.buffer(-64), plain.origin_um, plain.pixel_size_um)(
        0, 0, *a.shape)
    inside = polygon_mask(poly, plain.origin_um, plain.pixel_size_um)(0, 0, *a.shape)
    band = inside & ~inner & (a > 0)
    assert band.sum() > 1000 and (inner & (a > 0)).sum() > 1000
    np.testing.assert_array_equal(b[~band], a[~band])
    np.testing.assert_allclose(b[band], a[band] / 1.6, rtol=1e-6)
