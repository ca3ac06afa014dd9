"""Tests of the streaming, multiscale mosaic fusion (scanner.stitching.mosaic)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage

from scanner.ngff import level_transform, mosaic_region, open_mosaic
from scanner.stitching.mosaic import MosaicInfo, fuse_mosaic, mosaic_geometry

P = 0.65  # pixel size, µm
STAGE0 = (1234.5, -321.25)  # stage (x, y) of source-image coordinate (0, 0)


class CountingTiles:
    """Tile stack that records every read and only allows reading one whole tile at a time."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.reads: list[int] = []

    def __getitem__(self, key: object) -> np.ndarray:
        assert isinstance(key, int | np.integer), f"tiles read with {key!r}, not one index"
        self.reads.append(int(key))
        return self._data[key].copy()


def smooth_source(shape: tuple[int, int], seed: int = 0, sigma: float = 6.0) -> np.ndarray:
    """Smooth random float image spanning ~[5000, 60000]."""
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    img = (img - img.min()) / (img.max() - img.min())
    return 5000.0 + 55000.0 * img


def cut_tiles(
    source: np.ndarray, origins: np.ndarray, tile_shape: tuple[int, int], dtype: type
) -> tuple[np.ndarray, np.ndarray]:
    """Sample tiles from ``source`` at fractional source coordinates ``origins`` (row, col).

    Returns the tiles (rounded to ``dtype``) and the stage positions (x_um, y_um) of their pixel
    (0, 0): source coordinate (row, col) lies at stage ``STAGE0 + (col, row) * P``.
    """
    h, w = tile_shape
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float64)
    tiles = []
    for oy, ox in origins:
        vals = ndimage.map_coordinates(source, [rr + oy, cc + ox], order=3, mode="nearest")
        info = np.iinfo(dtype)
        tiles.append(np.clip(np.rint(vals), info.min, info.max).astype(dtype))
    positions = np.column_stack([STAGE0[0] + origins[:, 1] * P, STAGE0[1] + origins[:, 0] * P])
    return np.stack(tiles), positions


def grid_origins(
    n_rows: int, n_cols: int, step: tuple[float, float], seed: int = 1, base=(3.37, 5.81)
) -> np.ndarray:
    """Fractional source (row, col) origins of a jittered tile grid."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(n_rows):
        for c in range(n_cols):
            jitter = rng.uniform(-2.5, 2.5, size=2)
            out.append((base[0] + r * step[0] + jitter[0], base[1] + c * step[1] + jitter[1]))
    return np.array(out)


def translation(transforms: list[dict]) -> list[float]:
    return next(t["translation"] for t in transforms if t["type"] == "translation")


def scale(transforms: list[dict]) -> list[float]:
    return next(t["scale"] for t in transforms if t["type"] == "scale")


# --------------------------------------------------------------------------- geometry


def test_mosaic_geometry_covers_tiles_with_fractional_offsets() -> None:
    p = 0.5
    pos = np.array([[10.0, 20.0], [10.0 + 90.25 * p, 20.0 + 0.4 * p], [10.0, 20.0 + 80.0 * p]])
    origin, shape = mosaic_geometry(pos, (100, 120), p)
    assert origin == (10.0, 20.0)
    # cols: last tile column centre at offset 90.25 + 119 -> mosaic pixels 0..209
    # rows: last tile row centre at offset 80 + 99 = 179 exactly -> rows 0..179
    assert shape == (180, 210)


def test_mosaic_geometry_rejects_bad_positions() -> None:
    with pytest.raises(ValueError):
        mosaic_geometry(np.zeros((3, 3)), (10, 10), 1.0)
    with pytest.raises(ValueError):
        mosaic_geometry(np.zeros((0, 2)), (10, 10), 1.0)
    with pytest.raises(ValueError):
        mosaic_geometry(np.zeros((2, 2)), (10, 10), 0.0)


# --------------------------------------------------------------------------- reconstruction


@pytest.fixture(scope="module")
def smooth_case(tmp_path_factory: pytest.TempPathFactory):
    """A smooth image cut into a 3 x 3 grid of overlapping tiles at fractional positions."""
    source = smooth_source((560, 700))
    tile_shape = (180, 220)
    origins = grid_origins(3, 3, step=(165.3, 200.6))  # ~8-9 % overlap, jittered
    tiles, positions = cut_tiles(source, origins, tile_shape, np.uint16)
    counting = CountingTiles(tiles)
    out = tmp_path_factory.mktemp("smooth") / "mosaic.zarr"
    calls: list[tuple[int, int]] = []
    info = fuse_mosaic(
        counting,
        positions,
        P,
        out,
        chunk=64,
        min_level_size=64,
        progress=lambda d, t: calls.append((d, t)),
        name="smooth",
    )
    return source, origins, tile_shape, positions, info, counting, calls


def test_fused_level0_reproduces_source(smooth_case) -> None:
    source, origins, tile_shape, positions, info, _, _ = smooth_case
    levels, _ = open_mosaic(info.path)
    mosaic = levels[0][:].astype(np.float64)
    # Mosaic pixel (R, C) is at stage origin + (C, R) * P, i.e. at source (oy + R, ox + C).
    oy = (info.origin_um[1] - STAGE0[1]) / P
    ox = (info.origin_um[0] - STAGE0[0]) / P
    assert oy == pytest.approx(origins[:, 0].min(), abs=1e-9)
    assert ox == pytest.approx(origins[:, 1].min(), abs=1e-9)
    rr, cc = np.mgrid[0 : mosaic.shape[0], 0 : mosaic.shape[1]].astype(np.float64)
    truth = ndimage.map_coordinates(source, [rr + oy, cc + ox], order=3, mode="nearest")
    err = np.abs(mosaic - truth)[8:-8, 8:-8]  # interior, away from the outer border
    value_range = source.max() - source.min()
    assert err.max() < 0.01 * value_range, err.max()
    assert err.mean() < 0.001 * value_range, err.mean()
    # every interior pixel is covered
    assert np.all(mosaic[8:-8, 8:-8] > 0)


def test_fine_detail_survives_fractional_tile_positions(tmp_path: Path) -> None:
    # a pattern at a quarter of the sampling frequency, imaged by tiles whose positions fall
    # between mosaic pixels (fractions up to a half): each tile keeps its contrast (bilinear
    # resampling kept 71 % of it half a pixel off, so tiles differed in sharpness)
    def pattern(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        return 30000.0 + 8000.0 * (np.cos(r * np.pi / 2) + np.cos(c * np.pi / 2))

    origins = np.array([(0.0, 0.0), (0.5, 150.5), (150.25, 0.5), (150.5, 150.25)])
    h, w = 180, 180
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float64)
    tiles = np.stack([np.rint(pattern(rr + oy, cc + ox)) for oy, ox in origins]).astype(
        np.uint16)
    positions = np.column_stack([STAGE0[0] + origins[:, 1] * P, STAGE0[1] + origins[:, 0] * P])
    info = fuse_mosaic(tiles, positions, P, tmp_path / "m.zarr", chunk=64, min_level_size=64)
    levels, _ = open_mosaic(info.path)
    mosaic = levels[0][:].astype(np.float64)
    r, c = np.mgrid[0:mosaic.shape[0], 0:mosaic.shape[1]].astype(np.float64)
    err = np.abs(mosaic - pattern(r, c))
    for oy, ox in origins:  # each tile's interior, away from its borders and the overlaps
        r0, c0 = int(oy) + 40, int(ox) + 40
        assert err[r0:r0 + 60, c0:c0 + 60].max() < 0.06 * 16000, (oy, ox)


def test_fused_mosaic_has_right_shape_and_metadata(smooth_case) -> None:
    source, origins, tile_shape, positions, info, _, _ = smooth_case
    origin, shape = mosaic_geometry(positions, tile_shape, P)
    assert isinstance(info, MosaicInfo)
    assert info.shape == shape
    assert info.origin_um == pytest.approx(origin)
    assert info.pixel_size_um == P
    levels, transforms = open_mosaic(info.path)
    assert levels[0].shape == shape
    assert levels[0].dtype == np.uint16
    assert translation(transforms[0]) == pytest.approx([origin[1], origin[0]])
    assert scale(transforms[0]) == pytest.approx([P, P])


def test_mosaic_region_places_features_at_stage_coordinates(smooth_case) -> None:
    source, origins, tile_shape, positions, info, _, _ = smooth_case
    # A window whose pixel (0, 0) is the mosaic pixel nearest stage (x, y) equals the source
    # sampled there: check at an arbitrary point inside an overlap between tiles.
    sy, sx = 172.3, 210.8  # source coordinates
    x_um, y_um = STAGE0[0] + sx * P, STAGE0[1] + sy * P
    win = mosaic_region(info.path, x_um, y_um, (40, 50)).astype(np.float64)
    r = round((y_um - info.origin_um[1]) / P)
    c = round((x_um - info.origin_um[0]) / P)
    oy = (info.origin_um[1] - STAGE0[1]) / P
    ox = (info.origin_um[0] - STAGE0[0]) / P
    rr, cc = np.mgrid[0:40, 0:50].astype(np.float64)
    truth = ndimage.map_coordinates(source, [rr + r + oy, cc + c + ox], order=3)
    # the window starts within half a pixel of the requested point
    assert abs(r + oy - sy) <= 0.5 + 1e-9 and abs(c + ox - sx) <= 0.5 + 1e-9
    assert np.abs(win - truth).max() < 0.01 * (source.max() - source.min())
    # window partly outside the mosaic: zeros there
    x_end = info.origin_um[0] + (info.shape[1] - 10) * P
    win = mosaic_region(info.path, x_end, y_um, (5, 30))
    assert np.all(win[:, 10:] == 0) and np.all(win[:, :10] > 0)


def test_spot_centroid_lands_at_its_stage_position(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:300, 0:400].astype(np.float64)
    spot_rc = (151.37, 188.62)  # in the overlap of the 2 x 2 tiles
    source = 1000.0 + 40000.0 * np.exp(
        -((yy - spot_rc[0]) ** 2 + (xx - spot_rc[1]) ** 2) / (2 * 3.0**2)
    )
    origins = np.array([[0.0, 0.0], [0.0, 180.45], [140.7, 0.3], [141.2, 180.9]])
    tiles, positions = cut_tiles(source, origins, (150, 200), np.uint16)
    info = fuse_mosaic(tiles, positions, P, tmp_path / "spot.zarr", chunk=64)
    levels, transforms = open_mosaic(info.path)
    img = levels[0][:].astype(np.float64) - 1000.0
    img[img < 0] = 0
    cy, cx = ndimage.center_of_mass(img)
    ty, tx = translation(transforms[0])
    spot_x = STAGE0[0] + spot_rc[1] * P
    spot_y = STAGE0[1] + spot_rc[0] * P
    assert tx + cx * P == pytest.approx(spot_x, abs=0.05 * P)
    assert ty + cy * P == pytest.approx(spot_y, abs=0.05 * P)


def test_black_parts_of_a_sample_stay_distinct_from_unscanned(tmp_path: Path) -> None:
    # 0 means "no tile landed here" downstream (inspection leaves such pixels out): a black
    # part of the sample, read as 0 counts by the camera, is stored as 1, not as unscanned
    origins = np.array([[0.0, 0.0], [0.0, 180.45], [140.7, 0.3], [141.2, 180.9]])
    zeros = []
    for name, black in (("grey", False), ("black", True)):
        source = np.full((300, 400), 3000.0)
        if black:
            source[100:200, 120:260] = 0.0
        tiles, positions = cut_tiles(source, origins, (150, 200), np.uint16)
        info = fuse_mosaic(tiles, positions, P, tmp_path / f"{name}.zarr", chunk=64)
        level0 = open_mosaic(info.path)[0][0][:]
        zeros.append(level0 == 0)
    inside = level0[110:190, 130:250]
    assert inside.max() <= 1 and inside.min() == 1
    # 0 only where no tile reached, as without the black part
    np.testing.assert_array_equal(zeros[1], zeros[0])


# --------------------------------------------------------------------------- streaming


def test_tiles_read_one_at_a_time_and_few_times(smooth_case) -> None:
    _, origins, _, _, _, counting, _ = smooth_case
    n = len(origins)
    assert set(counting.reads) == set(range(n))
    # the LRU cache keeps re-reads low even with 64-px chunks and 180 x 220 tiles
    assert len(counting.reads) <= 2 * n


def test_progress_reports_every_chunk(smooth_case) -> None:
    *_, info, _, calls = smooth_case
    levels, _ = open_mosaic(info.path)
    total = sum(-(-a.shape[0] // 64) * -(-a.shape[1] // 64) for a in levels)
    assert calls[-1] == (total, total)
    assert [d for d, _ in calls] == list(range(1, total + 1))


def test_zarr_tiles_input(tmp_path: Path) -> None:
    source = smooth_source((200, 260), seed=3)
    origins = np.array([[0.0, 0.0], [0.6, 110.3], [95.2, 1.1], [96.0, 111.7]])
    tiles, positions = cut_tiles(source, origins, (100, 140), np.uint16)
    ztiles = zarr.create_array(
        str(tmp_path / "tiles.zarr"), shape=tiles.shape, chunks=(1, 100, 140), dtype="uint16"
    )
    ztiles[:] = tiles
    a = fuse_mosaic(ztiles, positions, P, tmp_path / "a.zarr", chunk=64)
    b = fuse_mosaic(tiles, positions, P, tmp_path / "b.zarr", chunk=64)
    np.testing.assert_array_equal(open_mosaic(a.path)[0][0][:], open_mosaic(b.path)[0][0][:])


# --------------------------------------------------------------------------- blending


def test_no_seam_between_tiles_with_different_gains(tmp_path: Path) -> None:
    h, w = 100, 120
    gains = [1.00, 1.05, 1.10, 1.15]
    tiles = np.stack([np.full((h, w), round(1000 * g), dtype=np.uint16) for g in gains])
    # 2 x 2 grid, overlaps of ~20.6 px (x) and ~18.3 px (y), fractional offsets
    offs = np.array([[0.0, 0.0], [99.4, 0.0], [0.0, 81.7], [99.4, 81.7]])  # (col, row) px
    positions = np.array([100.0, 200.0]) + offs * P
    info = fuse_mosaic(tiles, positions, P, tmp_path / "seam.zarr", chunk=64)
    img = open_mosaic(info.path)[0][0][:].astype(np.float64)
    assert img.shape == (181, 219)
    # away from overlaps every tile keeps its own value
    assert img[10, 10] == 1000 and img[10, 200] == 1050
    assert img[170, 10] == 1100 and img[170, 200] == 1150
    # horizontal transition in the top tile row: monotonic, spread over the overlap
    row = img[40]
    assert np.all(np.diff(row) >= 0)
    assert row[99] == pytest.approx(1000, abs=3) and row[119] == pytest.approx(1050, abs=3)
    # the largest step anywhere is about the linear ramp over the overlap, not a seam
    max_step = max(np.abs(np.diff(img, axis=0)).max(), np.abs(np.diff(img, axis=1)).max())
    linear_step = 100 / 18  # largest gain difference between neighbours / smallest overlap
    assert max_step <= 2 * linear_step, max_step
    # the transition spans the overlap: more than half its pixels are strictly in between
    band = row[100:119]
    assert np.count_nonzero((band > 1002) & (band < 1048)) >= 12


# --------------------------------------------------------------------------- pyramid


def _mean2(a: np.ndarray) -> np.ndarray:
    """Reference 2 x 2 mean with edge padding, rounded half up."""
    a = np.pad(a.astype(np.float64), ((0, a.shape[0] % 2), (0, a.shape[1] % 2)), mode="edge")
    m = a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2).mean(axis=(1, 3))
    return np.floor(m + 0.5)


def test_pyramid_levels_shapes_translations(tmp_path: Path) -> None:
    source = smooth_source((320, 520), seed=5)
    origins = grid_origins(2, 3, step=(150.4, 160.2), base=(1.2, 2.7))
    tiles, positions = cut_tiles(source, origins, (165, 175), np.uint16)
    info = fuse_mosaic(tiles, positions, P, tmp_path / "pyr.zarr", chunk=64, min_level_size=40)
    levels, transforms = open_mosaic(info.path)
    assert info.n_levels == len(levels) == len(transforms)
    shapes = [a.shape for a in levels]
    assert shapes[0] == info.shape
    for prev, cur in zip(shapes, shapes[1:], strict=False):
        assert cur == ((prev[0] + 1) // 2, (prev[1] + 1) // 2)
    assert max(shapes[-1]) <= 40 < max(shapes[-2])
    # e.g. 317 x 494 -> 159 x 247 -> 80 x 124 -> 40 x 62 -> 20 x 31
    assert len(levels) == 5
    x0, y0 = info.origin_um
    for k, tr in enumerate(transforms):
        assert levels[k].chunks == (64, 64)
        assert [t["type"] for t in tr] == ["scale", "translation"]
        assert scale(tr) == pytest.approx([P * 2**k] * 2)
        shift = (2**k - 1) / 2 * P
        assert translation(tr) == pytest.approx([y0 + shift, x0 + shift])
    for k in range(1, len(levels)):
        np.testing.assert_array_equal(levels[k][:], _mean2(levels[k - 1][:]))
    # level 1 at the stage position of its pixel centres ~ the source there
    l1 = levels[1][:].astype(np.float64)
    ty, tx = translation(transforms[1])
    rr, cc = np.mgrid[0 : l1.shape[0], 0 : l1.shape[1]].astype(np.float64)
    src_r = (ty + rr * 2 * P - STAGE0[1]) / P
    src_c = (tx + cc * 2 * P - STAGE0[0]) / P
    smooth = ndimage.uniform_filter(source, 2)  # ~ what a 2 x 2 mean sees
    truth = ndimage.map_coordinates(smooth, [src_r + 0.5, src_c + 0.5], order=1)
    err = np.abs(l1 - truth)[4:-4, 4:-4]
    assert err.max() < 0.02 * (source.max() - source.min())
    # mosaic_region at level 2
    win = mosaic_region(info.path, tx, ty, (10, 10), level=2)
    np.testing.assert_array_equal(win, levels[2][0:10, 0:10])


def test_large_mosaic_gets_at_least_five_levels(tmp_path: Path) -> None:
    # a sparse 10000 x 10000 px mosaic: 4 small corner tiles, the rest unscanned
    tiles = np.full((4, 64, 64), 7, dtype=np.uint8)
    p = 1.0
    positions = np.array([[0.0, 0.0], [9936.0, 0.0], [0.0, 9936.0], [9936.0, 9936.0]])
    info = fuse_mosaic(tiles, positions, p, tmp_path / "big.zarr", chunk=2048)
    assert info.shape == (10000, 10000)
    levels, _ = open_mosaic(info.path)
    assert len(levels) >= 5
    assert max(levels[-1].shape) <= 256 < max(levels[-2].shape)
    assert levels[0][9990, 9990] == 7 and levels[0][5000, 5000] == 0
    assert levels[-1][0, 0] == 7 and levels[-1][-1, -1] > 0


# --------------------------------------------------------------------------- dtypes, gaps


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_unscanned_areas_are_zero_and_dtype_kept(tmp_path: Path, dtype: type) -> None:
    value = 200 if dtype is np.uint8 else 40000
    h, w = 60, 80
    # an L of three tiles: the bottom-right quadrant is never scanned, plus a far-away tile
    offs = np.array([[0.0, 0.0], [70.5, 0.25], [0.75, 52.0], [400.0, 300.0]])  # (col, row) px
    tiles = np.full((4, h, w), value, dtype=dtype)
    info = fuse_mosaic(tiles, 50.0 + offs * P, P, tmp_path / "l.zarr", chunk=32)
    levels, _ = open_mosaic(info.path)
    img = levels[0][:]
    assert img.dtype == dtype and all(a.dtype == dtype for a in levels)
    assert img.shape == (360, 480)
    # covered pixels keep the constant value exactly (blending of equal values)
    assert np.all(img[0:110, 1:60] == value)
    assert np.all(img[60:, 0] == 0)  # tile 3 starts 0.75 px right: column 0 unscanned below
    assert np.all(img[1:50, 0:150] == value)
    assert np.all(img[0, 80:150] == 0)  # tile 2 starts 0.25 px down: its row 0 is unscanned
    # unscanned: the bottom-right of the L and the gap to the far tile
    assert np.all(img[113:300, 81:400] == 0)
    assert np.all(img[300:, 400:] == value)
    assert np.count_nonzero(img) == np.count_nonzero(img == value)
    # region read entirely outside the mosaic
    win = mosaic_region(info.path, -1000.0, -1000.0, (4, 4))
    assert win.dtype == dtype and not win.any()


# --------------------------------------------------------------------------- storage


def test_metadata_and_storage_layout(smooth_case) -> None:
    *_, info, _, _ = smooth_case
    meta = json.loads((info.path / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "group"
    ome = meta["attributes"]["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert ms["name"] == "smooth"
    assert ms["axes"] == [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    assert [d["path"] for d in ms["datasets"]] == [str(k) for k in range(info.n_levels)]
    arr_meta = json.loads((info.path / "0" / "zarr.json").read_text())
    assert arr_meta["dimension_names"] == ["y", "x"]
    assert arr_meta["chunk_grid"]["configuration"]["chunk_shape"] == [64, 64]
    assert any(c["name"] in ("zstd", "blosc") for c in arr_meta["codecs"])


def test_metadata_validates_with_yaozarrs(smooth_case) -> None:
    yaozarrs = pytest.importorskip("yaozarrs")
    *_, info, _, _ = smooth_case
    yaozarrs.validate_ome_json((info.path / "zarr.json").read_bytes())
    pytest.importorskip("fsspec")
    yaozarrs.validate_zarr_store(str(info.path))


class FailingTiles(CountingTiles):
    def __getitem__(self, key: object) -> np.ndarray:
        if int(key) == 2:
            raise OSError("camera file truncated")
        return super().__getitem__(key)


def test_failed_fusion_keeps_previous_mosaic(tmp_path: Path) -> None:
    out = tmp_path / "m.zarr"
    tiles = np.full((4, 40, 50), 123, dtype=np.uint16)
    positions = np.array([[0.0, 0.0], [45.0, 0.0], [0.0, 35.0], [45.0, 35.0]])
    first = fuse_mosaic(tiles, positions, 1.0, out, chunk=32)
    with pytest.raises(OSError, match="truncated"):
        fuse_mosaic(FailingTiles(tiles * 2), positions, 1.0, out, chunk=32)
    levels, _ = open_mosaic(out)
    assert levels[0].shape == first.shape and np.all(levels[0][:] == 123)
    # a successful run replaces it, and leaves no temporary folder behind
    fuse_mosaic(tiles * 2, positions, 1.0, out, chunk=32)
    assert np.all(open_mosaic(out)[0][0][:] == 246)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr"]


def test_mismatched_inputs_are_rejected(tmp_path: Path) -> None:
    tiles = np.zeros((3, 10, 10), dtype=np.uint16)
    with pytest.raises(ValueError, match="positions"):
        fuse_mosaic(tiles, np.zeros((2, 2)), 1.0, tmp_path / "x.zarr")
    with pytest.raises(ValueError):
        fuse_mosaic(np.zeros((10, 10), np.uint16), np.zeros((1, 2)), 1.0, tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()


def _foreign_store(path: Path, axes: list[str], units: str | None, scale: list[float],
                   translation: list[float] | None, zarr_format: int = 3) -> Path:
    """A one-level OME-NGFF store as other tools write them (its image: a 64 x 64 ramp)."""
    import zarr

    lead = len(axes) - 2
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    level = group.create_array("0", shape=(1,) * lead + (64, 64), dtype="uint16",
                               chunks=(1,) * lead + (64, 64))
    level[...] = np.arange(64 * 64, dtype="uint16").reshape((1,) * lead + (64, 64)) + 100
    transforms = [{"type": "scale", "scale": [1.0] * lead + scale}]
    if translation is not None:
        transforms.append({"type": "translation", "translation": [0.0] * lead + translation})
    spaces = {"t": "time", "c": "channel"}
    multiscale = {"axes": [{"name": a, "type": spaces.get(a, "space"),
                            **({"unit": units} if units and a not in spaces else {})}
                           for a in axes],
                  "datasets": [{"path": "0", "coordinateTransformations": transforms}]}
    if zarr_format == 2:
        group.attrs["multiscales"] = [{**multiscale, "version": "0.4"}]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    return path


@pytest.mark.parametrize(("units", "scale", "translation", "um"), [
    ("nanometer", [1000.0, 1000.0], [2000.0, -500.0], (1.0, [2.0, -0.5])),
    ("millimeter", [0.002, 0.002], [1.0, 0.0], (2.0, [1000.0, 0.0])),
    (None, [3.0, 3.0], None, (3.0, [0.0, 0.0])),  # no unit: µm; no translation: 0
])
def test_a_mosaic_from_another_tool_is_read_in_micrometres(tmp_path: Path, units, scale,
                                                          translation, um) -> None:
    # a scale in nm was read as µm (defects 1000 x off), and a store without a translation
    # (optional in OME-NGFF) crashed inspection with StopIteration
    path = _foreign_store(tmp_path / "m.ome.zarr", ["y", "x"], units, scale, translation)
    _, transforms = open_mosaic(path)
    got_scale, got_trans = level_transform(transforms)
    assert got_scale == pytest.approx([um[0]] * 2) and got_trans == pytest.approx(um[1])


@pytest.mark.parametrize(("axes", "units", "scale", "fmt", "said"), [
    (["t", "c", "z", "y", "x"], "micrometer", [1.0, 1.0], 3, "axes are ['t', 'c', 'z', 'y', 'x']"),
    (["x", "y"], "micrometer", [1.0, 1.0], 3, "axes are ['x', 'y']"),
    (["y", "x"], "micrometer", [2.0, 1.0], 3, "pixels of 2 x 1 µm"),
    (["y", "x"], "second", [1.0, 1.0], 3, "one length unit"),
    (["y", "x"], "micrometer", [1.0, 1.0], 2, "an OME-NGFF 0.4 (Zarr v2) image"),
])
def test_a_mosaic_waferscope_cannot_place_is_refused_in_one_line(
        tmp_path: Path, axes, units, scale, fmt, said) -> None:
    from typer.testing import CliRunner

    from scanner.cli import app

    path = _foreign_store(tmp_path / "m.ome.zarr", axes, units, scale, [0.0, 0.0], fmt)
    res = CliRunner().invoke(app, ["inspect", str(path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0] and "m.ome.zarr" in lines[0], lines


def test_a_foreign_mosaic_reads_chunks_it_never_wrote_as_its_fill_value(tmp_path: Path) -> None:
    # zarr-python 3 leaves out chunks that hold only the fill value (write_empty_chunks is
    # false by default), as the Zarr spec allows: a mosaic with a black surround was refused
    # as damaged. waferscope's own mosaics store every chunk, and a missing one stays damage.
    from scanner.errors import UserError
    from scanner.ngff import check_complete

    group = zarr.open_group(str(tmp_path / "m.ome.zarr"), mode="w")
    level = group.create_array("0", shape=(128, 128), dtype="uint16", chunks=(64, 64))
    image = np.zeros((128, 128), np.uint16)
    image[:64] = 500  # the lower chunks are black: never written
    level[...] = image
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0]}]}]}]}
    levels, _ = open_mosaic(tmp_path / "m.ome.zarr")
    assert levels[0].nchunks_initialized == 2
    check_complete(levels[0], "m")  # not refused
    np.testing.assert_array_equal(levels[0][...], image)
    ours = tmp_path / "ours.ome.zarr"
    fuse_mosaic(np.full((1, 64, 64), 300, np.uint16), np.zeros((1, 2)), 1.0, ours, chunk=32)
    (ours / "0" / "c" / "0" / "0").unlink()
    with pytest.raises(UserError, match="missing"):
        check_complete(open_mosaic(ours)[0][0], "ours")
