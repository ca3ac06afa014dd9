"""Virtual samples of the simulated microscope: geometry, determinism, defects, image files."""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from simulators.samples import (
    CELL_KINDS,
    SURFACE_KINDS,
    WAFER_KINDS,
    ImageSample,
    PVCellSample,
    RectangleSample,
    WaferSample,
    make_sample,
)
from simulators.samples.die import BARE_SI
from simulators.samples.shapes import points_in_polygon
from simulators.samples.texture import CHUCK_REFLECTANCE

# ----------------------------------------------------------------------------- fixtures

WAFER = dict(diameter_mm=50.0, orientation="notch", edge_exclusion_mm=2.0, die_pitch_mm=(5, 5),
             die_origin_mm=(-2.5, -2.5), scribe_width_um=100.0, center_um=(3000.0, -2000.0))


@pytest.fixture(scope="module")
def wafer() -> WaferSample:
    return WaferSample(**WAFER, n_defects=15, seed=7)


@pytest.fixture(scope="module")
def clean_wafer() -> WaferSample:
    return WaferSample(**WAFER, n_defects=0, seed=7)


CELL = dict(width_mm=40.0, height_mm=30.0, busbars=3, finger_pitch_mm=2.0,
            finger_width_um=80.0, center_um=(-5000.0, 4000.0))


@pytest.fixture(scope="module")
def cell() -> PVCellSample:
    return PVCellSample(**CELL, n_defects=10, seed=11)


@pytest.fixture(scope="module")
def clean_cell() -> PVCellSample:
    return PVCellSample(**CELL, n_defects=0, seed=11)


RECT = dict(width_mm=6.0, height_mm=4.0, center_um=(10000.0, -5000.0))


@pytest.fixture(scope="module")
def rect() -> RectangleSample:
    return RectangleSample(**RECT, n_defects=8, seed=3)


def _texture(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Smooth-ish uint16 test image with distinct values (a noisy gradient)."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]]
    base = 20000 + 15000 * np.sin(rr / 37.0) * np.cos(cc / 23.0)
    return (base + rng.integers(0, 3000, size=shape)).astype(np.uint16)


@pytest.fixture(scope="module")
def coupon(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    img = _texture((300, 400), seed=1)
    path = tmp_path_factory.mktemp("img") / "coupon.tif"
    tifffile.imwrite(path, img)
    return path, img


def _ref(raw: np.ndarray, scale: float = 65535.0) -> np.ndarray:
    """The documented normalisation: value / dtype max, as float32."""
    return (raw.astype(np.float64) / scale).astype(np.float32)


def _pixel(sample, x: float, y: float, p: float = 2.0, n: int = 1) -> np.ndarray:
    """n x n pixels centred on a stage point."""
    h = (n - 1) / 2 * p
    return sample.render(x - h, y - h, (n, n), p)


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", ["wafer", "cell", "rect"])
def test_render_is_float32_in_range_and_deterministic(name, request):
    sample = request.getfixturevalue(name)
    x0, y0, x1, y1 = sample.bounds_um()
    args = (x0 + 0.3 * (x1 - x0), y0 + 0.4 * (y1 - y0), (64, 96), 3.0)
    a = sample.render(*args)
    assert a.dtype == np.float32 and a.shape == (64, 96)
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert a.std() > 0.0
    np.testing.assert_array_equal(a, sample.render(*args))


def test_same_parameters_give_same_sample():
    a = RectangleSample(**RECT, n_defects=5, seed=9)
    b = make_sample("rectangle", **RECT, n_defects=5, seed=9)
    assert a.truth() == b.truth()
    np.testing.assert_array_equal(a.render(7000, -7000, (80, 80), 40.0),
                                  b.render(7000, -7000, (80, 80), 40.0))
    c = RectangleSample(**RECT, n_defects=5, seed=10)
    assert [d.x_um for d in c.defects()] != [d.x_um for d in a.defects()]


def _halves_agree(sample, x0: float, y0: float, p: float, rows: int = 120, cols: int = 200):
    """Render a region whole and as two overlapping halves; the overlap must match exactly."""
    whole = sample.render(x0, y0, (rows, cols), p)
    left = sample.render(x0, y0, (rows, 120), p)
    right = sample.render(x0 + 80 * p, y0, (rows, cols - 80), p)
    np.testing.assert_array_equal(left, whole[:, :120])
    np.testing.assert_array_equal(right, whole[:, 80:])
    top = sample.render(x0, y0 + 50 * p, (rows - 50, cols), p)
    np.testing.assert_array_equal(top, whole[50:])
    return whole


@pytest.mark.parametrize("p", [1.0, 4.0])
def test_wafer_tiles_agree_in_overlap(wafer, p):
    # a tile around each defect kind, and one across the wafer edge at the notch
    seen = set()
    for d in wafer.defects():
        if d.kind in seen:
            continue
        seen.add(d.kind)
        _halves_agree(wafer, round(d.x_um) - 100 * p, round(d.y_um) - 60 * p, p)
    # 0.3 mm deep into the 1 mm notch, its side is 0.7 mm from the axis
    notch_y = WAFER["center_um"][1] + 25000.0 - 300.0
    whole = _halves_agree(wafer, WAFER["center_um"][0] + 700 - 100 * p, notch_y - 60 * p, p)
    assert whole.min() < 0.1 < 0.3 < whole.max()  # the edge is in the region


def test_cell_and_rectangle_tiles_agree_in_overlap(cell, rect):
    for sample, p in ((cell, 20.0), (cell, 8.0), (rect, 2.0), (rect, 16.0)):
        for d in sample.defects()[:5]:
            _halves_agree(sample, round(d.x_um) - 100 * p, round(d.y_um) - 60 * p, p)
    # across a corner of the cell (edge coverage and background)
    x0, y0, _, _ = cell.bounds_um()
    whole = _halves_agree(cell, x0 - 1000, y0 - 600, 10.0)
    assert whole[0, 0] < 0.1 and whole[-1, -1] > 0.1


# ----------------------------------------------------------------------------- defects


def test_truth_is_json_and_consistent(wafer, cell, rect):
    for sample in (wafer, cell, rect):
        truth = json.loads(json.dumps(sample.truth()))
        assert truth["sample"]["kind"] == sample.kind
        defects = truth["defects"]
        assert [d["id"] for d in defects] == list(range(len(defects)))
        poly = sample.usable_polygon_um()
        for d in defects:
            x0, y0, x1, y1 = d["bbox_um"]
            assert x0 <= d["x_um"] <= x1 and y0 <= d["y_um"] <= y1
            assert d["size_um"] >= max(x1 - x0, y1 - y0) * 0.7 > 0
            assert d["contrast"] != 0
            # placed wholly inside the usable area
            inside = points_in_polygon(np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1]),
                                       poly)
            assert inside.all(), d
    assert truth["sample"]["n_defects"] == 8
    # kinds are assigned round-robin, so every kind appears
    assert [d.kind for d in wafer.defects()[:5]] == list(WAFER_KINDS)
    assert {d.kind for d in cell.defects()} == set(CELL_KINDS)
    assert {d.kind for d in rect.defects()} == set(SURFACE_KINDS)


def test_more_defects_keep_the_first_ones():
    a = RectangleSample(**RECT, n_defects=4, seed=5).defects()
    b = RectangleSample(**RECT, n_defects=9, seed=5).defects()
    assert a == b[:4]


def test_defect_sizes_are_visible_at_4um(wafer):
    sizes = {d.kind: [] for d in wafer.defects()}
    for d in WaferSample(**WAFER, n_defects=60, seed=2).defects():
        sizes.setdefault(d.kind, []).append(d.size_um)
    assert min(sizes["scratch"]) >= 200 and max(sizes["scratch"]) <= 3100
    small = [s for k in ("particle", "pit") for s in sizes[k]]
    assert np.mean(np.array(small) >= 12.0) >= 0.8  # >= 3 px at 4 µm/px for most
    assert max(sizes["stain"]) <= 1600 and min(sizes["stain"]) >= 100


def _check_defects_visible(sample, clean, p: float) -> set[str]:
    """Each defect changes the image at its centre; far from all defects nothing changes."""
    kinds = set()
    for d in sample.defects():
        with_d = _pixel(sample, d.x_um, d.y_um, p, n=3)
        without = _pixel(clean, d.x_um, d.y_um, p, n=3)
        diff = with_d - without
        if d.kind == "missing_pattern":
            x0, y0, x1, y1 = d.bbox_um
            n = max(int((x1 - x0) / p) - 2, 1), max(int((y1 - y0) / p) - 2, 1)
            args = (x0 + 1.5 * p, y0 + 1.5 * p, (n[1], n[0]), p)
            patch = sample.render(*args)
            # the die pattern is gone: the patch is bare silicon
            np.testing.assert_allclose(patch, BARE_SI, atol=0.02)
            assert np.abs(patch - clean.render(*args)).mean() > 0.02
        else:
            if d.kind in ("crack", "dark_area", "finger_interruption"):
                # relative darkening (EL): also visible on a dark busbar
                assert np.abs(diff).mean() > 0.1 * without.mean(), d
            else:
                assert np.abs(diff).mean() > 0.03, d
            if d.kind in ("pit", "crack", "dark_area", "finger_interruption"):
                assert diff[1, 1] < 0, d  # dark at the core
            elif d.kind in ("particle", "stain"):
                assert np.sign(diff[1, 1]) == np.sign(d.contrast), d
        kinds.add(d.kind)
    return kinds


def test_defects_appear_where_truth_says(wafer, clean_wafer, cell, clean_cell, rect):
    assert _check_defects_visible(wafer, clean_wafer, 4.0) == set(WAFER_KINDS)
    assert _check_defects_visible(cell, clean_cell, 10.0) == set(CELL_KINDS)
    clean_rect = RectangleSample(**RECT, n_defects=0, seed=3)
    assert _check_defects_visible(rect, clean_rect, 2.0) == set(SURFACE_KINDS)
    # away from every defect, the defect-free render is unchanged
    far = (WAFER["center_um"][0] - 15000.0, WAFER["center_um"][1] - 15000.0)
    assert all(
        not (d.bbox_um[0] - 2000 < far[0] < d.bbox_um[2] + 2000
             and d.bbox_um[1] - 2000 < far[1] < d.bbox_um[3] + 2000)
        for d in wafer.defects()
    )
    np.testing.assert_array_equal(wafer.render(*far, (50, 50), 4.0),
                                  clean_wafer.render(*far, (50, 50), 4.0))


def test_defect_kinds_are_validated():
    with pytest.raises(ValueError, match="missing_pattern"):
        PVCellSample(**CELL, defect_kinds=["missing_pattern"])
    with pytest.raises(ValueError, match="bogus"):
        RectangleSample(**RECT, defect_kinds=["bogus"])
    s = RectangleSample(**RECT, n_defects=4, defect_kinds=["pit"])
    assert {d.kind for d in s.defects()} == {"pit"}


# ----------------------------------------------------------------------------- wafer geometry


def test_wafer_edge_notch_and_background(clean_wafer):
    cx, cy = WAFER["center_um"]
    r = 25000.0
    # inside the edge (left, right, top) vs just outside the diameter
    for ux, uy in ((-1, 0), (1, 0), (0, -1)):
        inside = _pixel(clean_wafer, cx + ux * (r - 300), cy + uy * (r - 300))[0, 0]
        outside = _pixel(clean_wafer, cx + ux * (r + 300), cy + uy * (r + 300))[0, 0]
        assert inside == pytest.approx(BARE_SI, abs=0.01)
        assert abs(outside - CHUCK_REFLECTANCE) < 0.03
    # the notch points to +y (6 o'clock): 0.5 mm in from the edge at +y is off the wafer,
    # the same point at -y is on it
    assert _pixel(clean_wafer, cx, cy + r - 500)[0, 0] < 0.1
    assert _pixel(clean_wafer, cx, cy - r + 500)[0, 0] == pytest.approx(BARE_SI, abs=0.01)
    # the V has 90° opening: at depth 0.5 mm it is 1 mm wide
    assert _pixel(clean_wafer, cx + 450, cy + r - 500)[0, 0] < 0.1
    assert _pixel(clean_wafer, cx + 700, cy + r - 500)[0, 0] > 0.3
    # a tile far outside the wafer is all chuck
    far = clean_wafer.render(cx + 40000, cy, (32, 32), 10.0)
    assert abs(far.mean() - CHUCK_REFLECTANCE) < 0.02 and far.max() < 0.1


def test_wafer_flat_and_orientation_angle():
    w = WaferSample(diameter_mm=100.0, orientation="flat", flat_length_mm=32.5,
                    edge_exclusion_mm=3.0, n_defects=0, die_pitch_mm=(8, 8))
    h = math.sqrt(50000.0**2 - 16250.0**2)  # flat distance from the centre
    assert _pixel(w, 0, h + 300)[0, 0] < 0.1  # cut off by the flat at +y
    assert _pixel(w, 0, -(h + 300))[0, 0] > 0.3  # the opposite side is round
    assert _pixel(w, 0, h - 300)[0, 0] > 0.3
    poly = w.usable_polygon_um()
    assert poly[:, 1].max() <= h - 3000.0 + 1e-6
    # 0° puts the notch at +x (3 o'clock)
    w0 = WaferSample(diameter_mm=50.0, orientation_angle_deg=0.0, n_defects=0,
                     die_pitch_mm=(5, 5), edge_exclusion_mm=2.0)
    assert _pixel(w0, 25000 - 500, 0)[0, 0] < 0.1
    assert _pixel(w0, 0, 25000 - 500)[0, 0] > 0.3


def test_usable_polygon_keeps_the_edge_exclusion(clean_wafer):
    cx, cy = WAFER["center_um"]
    r, e, d = 25000.0, 2000.0, 1000.0
    poly = clean_wafer.usable_polygon_um()
    assert poly.shape[1] == 2 and len(poly) > 100
    # the wafer outline, sampled densely: circle minus the notch V (apex at r - d, 90°)
    t = np.linspace(0, 2 * np.pi, 20000, endpoint=False)
    circle = np.c_[r * np.cos(t), r * np.sin(t)]
    circle = circle[circle[:, 1] - (r - d) <= np.abs(circle[:, 0]) + 1e-9]
    s = np.linspace(0, 1, 2000)[:, None]
    half = d + 200.0
    v_left = np.array([0.0, r - d]) + s * np.array([-half, half])
    v_right = np.array([0.0, r - d]) + s * np.array([half, half])
    outline = np.vstack([circle, v_left, v_right]) + np.array([cx, cy])
    dist = np.sqrt(((poly[:, None, :] - outline[None, :, :]) ** 2).sum(-1)).min(axis=1)
    assert dist.min() >= e * 0.999
    assert np.hypot(poly[:, 0] - cx, poly[:, 1] - cy).max() <= r - e + 1e-6
    # and it is not needlessly small: most of the shrunk circle
    area = 0.5 * abs(np.dot(poly[:, 0], np.roll(poly[:, 1], 1))
                     - np.dot(poly[:, 1], np.roll(poly[:, 0], 1)))
    assert area > 0.98 * math.pi * (r - e) ** 2


def test_only_whole_dies_are_patterned_and_dies_repeat(clean_wafer):
    cx, cy = WAFER["center_um"]
    ox, oy = cx - 2500.0, cy - 2500.0  # die-cell corner
    # two neighbouring full dies look the same
    a = clean_wafer.render(ox + 400, oy + 700, (200, 300), 2.0)
    b = clean_wafer.render(ox + 5000 + 400, oy + 700, (200, 300), 2.0)
    c = clean_wafer.render(ox + 400, oy - 5000 + 700, (200, 300), 2.0)
    assert a.std() > 0.05  # there is a pattern
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    # the die cell x in [-22.5, -17.5], y in [-7.5, -2.5] mm from the centre reaches
    # beyond the 23 mm usable radius (corner at 23.7 mm): bare silicon
    bare = clean_wafer.render(cx - 21000, cy - 6000, (100, 100), 10.0)
    np.testing.assert_allclose(bare, BARE_SI, atol=1e-6)
    # scribe lanes are bare silicon between patterned dies
    lane = clean_wafer.render(ox + 5000 - 30, oy + 1000, (100, 30), 2.0)
    np.testing.assert_allclose(lane, BARE_SI, atol=1e-6)
    assert clean_wafer.truth()["sample"]["n_patterned_dies"] > 20


def test_patterned_edge_dies_carry_the_design_where_the_wafer_is():
    bare = WaferSample(**WAFER, n_defects=0, seed=7)
    exposed = WaferSample(**WAFER, n_defects=0, seed=7, edge_dies="patterned")
    cx, cy = WAFER["center_um"]
    ox, oy = cx + WAFER["die_origin_mm"][0] * 1000, cy + WAFER["die_origin_mm"][1] * 1000
    # the same place in a whole die and in the edge die of cell x in [-22.5, -17.5],
    # y in [-7.5, -2.5] mm from the centre (partly beyond the 23 mm usable radius)
    inner = exposed.render(ox + 400, oy + 700, (200, 300), 2.0)
    x, y = ox - 20000 + 400, oy - 5000 + 700
    edge = exposed.render(x, y, (200, 300), 2.0)
    assert np.hypot(x + 600 - cx, y - cy) < WAFER["diameter_mm"] * 500 - 1000  # on the wafer
    np.testing.assert_array_equal(inner, edge)
    np.testing.assert_allclose(bare.render(x, y, (200, 300), 2.0), BARE_SI, atol=1e-6)
    assert exposed.truth()["sample"]["n_patterned_dies"] \
        > bare.truth()["sample"]["n_patterned_dies"]
    with pytest.raises(ValueError, match="edge_dies"):
        WaferSample(**WAFER, edge_dies="some")


# ----------------------------------------------------------------------------- PV cell


def test_cell_busbars_fingers_and_background(clean_cell):
    cx, cy = CELL["center_um"]
    w, h = CELL["width_mm"] * 1000, CELL["height_mm"] * 1000
    bus_x = cx - w / 2 + 0.5 * w / 3  # first busbar centre
    assert _pixel(clean_cell, bus_x, cy, 10.0)[0, 0] < 0.1
    # fingers along x: a finger row is darker than the row half a pitch away
    y_f = cy - h / 2 + 0.5 * 2000.0 + 10 * 2000.0
    x = cx + 3000.0
    on = clean_cell.render(x, y_f, (1, 200), 5.0)
    off = clean_cell.render(x, y_f + 1000.0, (1, 200), 5.0)
    assert (on / off).mean() < 0.7
    assert _pixel(clean_cell, cx - w / 2 - 500, cy, 10.0)[0, 0] < 0.1
    # grains: the emission varies across the cell (EL texture)
    img = clean_cell.render(cx - 15000, cy - 10000, (100, 100), 100.0)
    assert img.std() > 0.03


# ----------------------------------------------------------------------------- image sample


def test_image_native_resolution_is_exact(coupon):
    path, raw = coupon
    s = ImageSample(path, pixel_size_um=1.0)
    assert s.image_shape == (300, 400) and s.lazy
    np.testing.assert_array_equal(s.render(0, 0, (300, 400), 1.0), _ref(raw))
    np.testing.assert_array_equal(s.render(17, 5, (40, 60), 1.0), _ref(raw[5:45, 17:77]))
    x0, y0, x1, y1 = s.bounds_um()
    assert (x0, y0, x1, y1) == (-0.5, -0.5, 399.5, 299.5)


def test_image_detail_does_not_depend_on_where_the_stage_puts_a_tile(tmp_path):
    # a fine pattern (period 4 px) seen on the file's grid and half a pixel off it: the same
    # contrast, as a camera over a continuous surface sees it (bilinear lookup kept 71 %)
    cc = np.arange(256)
    stripes = (32768 + 16384 * np.cos(cc * np.pi / 2)).astype(np.uint16)
    path = tmp_path / "stripes.tif"
    tifffile.imwrite(path, np.tile(stripes, (64, 1)))
    s = ImageSample(path, pixel_size_um=1.0)

    def contrast(x0: float) -> float:
        row = s.render(x0, 20.0, (1, 200), 1.0)[0, 20:-20].astype(np.float64)
        return float(np.hypot(*np.fft.rfft(row - row.mean())[[40]].view(float)[:2])) / 80

    on_grid, off_grid = contrast(10.0), contrast(10.5)
    assert on_grid == pytest.approx(0.25, rel=0.01)
    assert off_grid == pytest.approx(on_grid, rel=0.06)


def test_image_origin_offset_and_pixel_size(coupon):
    path, raw = coupon
    s = ImageSample(path, pixel_size_um=0.65, origin_um=(1234.5, -678.9))
    x0, y0 = 1234.5 + 11 * 0.65, -678.9 + 7 * 0.65
    np.testing.assert_array_equal(s.render(x0, y0, (30, 50), 0.65), _ref(raw[7:37, 11:61]))
    # half-way between pixel centres: between the two neighbours, nearer their mean than
    # either (the interpolating kernel weighs them alike)
    mid = s.render(x0 + 0.325, y0, (1, 1), 0.65)[0, 0]
    a, b = raw[7, 11] / 65535.0, raw[7, 12] / 65535.0
    assert abs(mid - (a + b) / 2) < abs(a - b) / 4
    # coarser camera pixels average the file pixels under them (no aliasing)
    s1 = ImageSample(path, pixel_size_um=1.0)
    coarse = s1.render(1.5, 1.5, (50, 75), 4.0)
    block = raw[:200, :300].astype(np.float64).reshape(50, 4, 75, 4).mean(axis=(1, 3)) / 65535
    np.testing.assert_allclose(coarse, block, atol=1e-6)
    # outside the image: the chuck
    assert s1.render(-100, -100, (3, 3), 1.0).max() < 0.1


def test_image_coarse_tiles_agree_in_overlap(coupon):
    s = ImageSample(coupon[0], pixel_size_um=1.0)
    _halves_agree(s, -20.0, -10.0, 1.5, rows=100, cols=200)
    _halves_agree(s, 3.0, 7.0, 0.5, rows=100, cols=200)


def test_image_region_png_and_rgb(tmp_path, coupon):
    s = ImageSample(coupon[0], pixel_size_um=2.0, origin_um=(100, 200), region_px=(10, 20, 50, 60))
    poly = s.usable_polygon_um()
    np.testing.assert_allclose(poly.min(axis=0), [100 + 19.5 * 2, 200 + 9.5 * 2])
    np.testing.assert_allclose(poly.max(axis=0), [100 + 79.5 * 2, 200 + 59.5 * 2])
    rgb = np.random.default_rng(2).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    png = tmp_path / "rgb.png"
    iio.imwrite(png, rgb)
    sp = make_sample("image", path=str(png), pixel_size_um=1.0)
    assert not sp.lazy
    lum = 0.2126 * rgb[..., 0] + 0.7152 * rgb[..., 1] + 0.0722 * rgb[..., 2]
    np.testing.assert_allclose(sp.render(0, 0, (40, 50), 1.0), lum / 255.0, atol=1e-6)
    tif = tmp_path / "rgb.tif"
    tifffile.imwrite(tif, rgb, photometric="rgb")
    st = ImageSample(tif, pixel_size_um=1.0)
    np.testing.assert_allclose(st.render(0, 0, (40, 50), 1.0), lum / 255.0, atol=1e-6)
    gray8 = tmp_path / "g.png"
    iio.imwrite(gray8, rgb[..., 1])
    np.testing.assert_array_equal(ImageSample(gray8, 1.0).render(0, 0, (40, 50), 1.0),
                                  _ref(rgb[..., 1], 255.0))


def test_image_errors(tmp_path, coupon):
    missing = tmp_path / "nope.tif"
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        ImageSample(missing, pixel_size_um=1.0)
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"this is not a tiff file at all")
    with pytest.raises(ValueError, match="bad.tif"):
        ImageSample(bad, pixel_size_um=1.0)
    with pytest.raises(ValueError, match="region_px"):
        ImageSample(coupon[0], pixel_size_um=1.0, region_px=(0, 0, 301, 10))
    with pytest.raises(ValueError, match="unknown sample kind"):
        make_sample("disc")
    with pytest.raises(ValueError, match="wafer sample"):
        make_sample("wafer", radius_mm=3)


def test_image_reads_lazily(tmp_path, monkeypatch):
    from tifffile.zarr import ZarrTiffStore

    n = 4096
    rr = np.arange(n, dtype=np.uint32)
    big = ((rr[:, None] * 7 + rr[None, :] * 13) % 65521).astype(np.uint16)  # 32 MiB
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, big, tile=(256, 256), compression="zlib")

    keys: list[str] = []
    original = ZarrTiffStore.get

    async def spy(self, key, *args, **kwargs):
        keys.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(ZarrTiffStore, "get", spy)
    tracemalloc.start()
    try:
        # made, the sample reads the whole file once (damage and NaN are refused then), a
        # strip at a time
        s = ImageSample(path, pixel_size_um=1.0)
        _, survey_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        keys.clear()
        img = s.render(1000.0, 2000.0, (128, 128), 1.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(img, _ref(big[2000:2128, 1000:1128]))
    assert peak < 4 * 2**20  # the file holds 32 MiB of pixels
    assert survey_peak < 12 * 2**20
    chunks = [k for k in keys if not k.endswith("zarr.json") and not k.endswith(".zarray")]
    assert 1 <= len(chunks) <= 4  # a 128 px window touches at most 2 x 2 tiles of 256 px
    s.close()


def test_random_tiles_agree_with_a_larger_render(wafer, cell, rect, coupon):
    """Sub-tiles at random offsets (edges, defects, many pixel sizes) match a larger render."""
    image = ImageSample(coupon[0], pixel_size_um=1.3, origin_um=(-30.0, -20.0), n_defects=4)
    rng = np.random.default_rng(0)
    for sample in (wafer, cell, rect, image):
        x0b, y0b, x1b, y1b = sample.bounds_um()
        defects = sample.defects()
        for trial in range(12):
            p = float(rng.choice([0.5, 1.0, 3.0, 4.0, 8.0, 30.0]))
            if trial % 2:
                d = defects[int(rng.integers(len(defects)))]
                cx, cy = d.x_um, d.y_um
            else:  # anywhere, edges and chuck included
                cx = rng.uniform(x0b - 200 * p, x1b + 200 * p)
                cy = rng.uniform(y0b - 200 * p, y1b + 200 * p)
            x0, y0 = round(cx) - 60 * p, round(cy) - 50 * p
            whole = sample.render(x0, y0, (100, 120), p)
            k, m = int(rng.integers(10, 110)), int(rng.integers(10, 90))
            part = sample.render(x0 + k * p, y0 + m * p, (100 - m + 7, 120 - k + 7), p)
            np.testing.assert_array_equal(part[: 100 - m, : 120 - k], whole[m:, k:])
    # a tile whose last row is partly off the rectangle, against one that goes past it
    edge = RECT["center_um"][1] + 2000.0
    whole = rect.render(9000.0, edge - 1.0 - 99 * 3.0, (100, 50), 3.0)
    np.testing.assert_array_equal(rect.render(9000.0, edge - 1.0, (5, 50), 3.0)[0], whole[-1])
    assert whole[-1].mean() < whole[-2].mean() - 0.05  # 5/6 covered: darker than inside


@pytest.mark.parametrize("pitch_um", [(3000.0, 4000.0), (4000.0, 3000.0), (5000.0, 6100.0)])
def test_die_template_with_unequal_pitches(pitch_um):
    """Templates whose sides halve a different number of times still build a full pyramid."""
    from simulators.samples.die import DieTemplate

    template = DieTemplate(pitch_um, 80.0, seed=0)
    for fine, coarse in zip(template.levels, template.levels[1:], strict=False):
        assert coarse.shape == (fine.shape[0] // 2, fine.shape[1] // 2)
    patch = template.sample(np.linspace(0, pitch_um[0], 50), np.linspace(0, pitch_um[1], 40), 5.0)
    assert patch.shape == (40, 50) and np.isfinite(patch).all()


def _picture() -> np.ndarray:
    """A grey test picture (0..1) with structure in every direction."""
    yy, xx = np.mgrid[0:96, 0:128]
    return (0.5 + 0.3 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + 0.1 * (xx / 128)).astype(float)


@pytest.mark.parametrize("kind", ["int32", "uint32", "float_over_1", "cmyk_tiff", "cmyk_jpeg"])
def test_image_pixels_of_unusual_types_are_read_as_the_picture_not_black(tmp_path, kind):
    from PIL import Image

    pic = _picture()
    path = tmp_path / ("p.jpg" if kind == "cmyk_jpeg" else "p.tif")
    grey8 = (pic * 255).round().astype(np.uint8)
    if kind in ("int32", "uint32"):
        tifffile.imwrite(path, (pic * 3e6).astype(kind))  # white is not 2**31
    elif kind == "float_over_1":
        tifffile.imwrite(path, (pic * 4095).astype(np.float32))  # raw counts as floats
    else:
        cmyk = Image.fromarray(np.stack([grey8] * 3, -1)).convert("CMYK")
        if kind == "cmyk_jpeg":
            cmyk.save(path, quality=95)
        else:
            tifffile.imwrite(path, np.asarray(cmyk), photometric="separated")
    s = ImageSample(path, pixel_size_um=1.0)
    seen = s.render(0.0, 0.0, (96, 128), 1.0)
    assert np.corrcoef(seen.ravel(), pic.ravel())[0, 1] > 0.99
    assert abs(float(seen.mean()) / float(pic.mean()) - 1) < 0.35  # bright, not black
    from models.data import read_image

    learnt = read_image(path)  # training and inspection read the file the same way
    assert np.corrcoef(learnt.ravel(), pic.ravel())[0, 1] > 0.99


def test_a_phone_picture_is_read_turned_as_its_exif_says_everywhere(tmp_path):
    from PIL import Image

    from models.data import read_image
    from simulators.geometry import image_shape

    pic = _picture()
    im = Image.fromarray((pic * 255).round().astype(np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # stored landscape, shown turned 90 deg clockwise
    im.save(tmp_path / "phone.jpg", quality=95, exif=exif)
    shown = np.rot90(pic, -1)
    # the plan, the scanned sample and the model all see the picture as a viewer shows it
    assert image_shape(tmp_path / "phone.jpg") == shown.shape
    seen = ImageSample(tmp_path / "phone.jpg", pixel_size_um=1.0).render(0.0, 0.0, shown.shape, 1.0)
    assert np.corrcoef(seen.ravel(), shown.ravel())[0, 1] > 0.99
    assert np.corrcoef(read_image(tmp_path / "phone.jpg").ravel(), shown.ravel())[0, 1] > 0.99


def test_a_tiff_with_a_thumbnail_first_is_read_as_its_picture(tmp_path):
    from models.data import read_image
    from simulators.geometry import image_shape

    pic = _picture()
    with tifffile.TiffWriter(tmp_path / "two.tif") as tif:
        tif.write((pic[::8, ::8] * 255).astype(np.uint8))  # a preview, written first
        tif.write((pic * 65535).astype(np.uint16))
    # the plan, the scanned sample and the model all take the picture, not the preview
    assert image_shape(tmp_path / "two.tif") == pic.shape
    seen = ImageSample(tmp_path / "two.tif", pixel_size_um=1.0).render(0.0, 0.0, pic.shape, 1.0)
    assert np.corrcoef(seen.ravel(), pic.ravel())[0, 1] > 0.99
    assert read_image(tmp_path / "two.tif").shape == pic.shape


def test_a_tiff_stack_is_refused_not_read_as_its_first_page(tmp_path):
    from models.data import read_image
    from scanner.errors import UserError
    from simulators.geometry import image_shape

    stack = (np.stack([_picture()] * 5) * 60000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "z.tif", stack)  # a z-stack: which page is the sample?
    with pytest.raises(UserError, match="5 along Q"):
        image_shape(tmp_path / "z.tif")
    with pytest.raises(ValueError, match="holds several images"):
        ImageSample(tmp_path / "z.tif", pixel_size_um=1.0)
    with pytest.raises(UserError, match="holds several images"):
        read_image(tmp_path / "z.tif")
    # two pictures of one size written one after the other: the first was used silently
    pic = (_picture() * 60000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "two.tif", pic)
    tifffile.imwrite(tmp_path / "two.tif", pic[::-1], append=True)
    with pytest.raises(UserError, match="2 of the same size"):
        read_image(tmp_path / "two.tif")
    with pytest.raises(ValueError, match="2 of the same size"):
        ImageSample(tmp_path / "two.tif", pixel_size_um=1.0)
    # one picture with its colour samples is one image
    rgb = (np.stack([_picture()] * 3, -1) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    assert image_shape(tmp_path / "rgb.tif") == rgb.shape[:2]
    assert read_image(tmp_path / "rgb.tif").shape == rgb.shape[:2]
    planar = np.moveaxis(rgb, -1, 0)
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    assert read_image(tmp_path / "planar.tif").shape == rgb.shape[:2]
    # three grey channels (ImageJ, OME-TIFF) are no colour: they were mixed into one
    # "luminance" while two or five were refused
    tifffile.imwrite(tmp_path / "ch3.tif", planar, imagej=True, metadata={"axes": "CYX"})
    with pytest.raises(UserError, match="3 along C"):
        read_image(tmp_path / "ch3.tif")


@pytest.mark.parametrize("damage", ["nan", "truncated_tiles"])
def test_a_damaged_image_file_is_refused_when_the_sample_is_made(tmp_path, damage):
    path = tmp_path / "d.tif"
    if damage == "nan":
        pic = _picture().astype(np.float32)
        pic[40:50, 60:70] = np.nan
        tifffile.imwrite(path, pic)
    else:  # a tiled, compressed file cut in half: its first tile still reads
        big = np.tile((_picture() * 60000).astype(np.uint16), (8, 8))
        tifffile.imwrite(path, big, tile=(64, 64), compression="zlib")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot read image"):
        ImageSample(path, pixel_size_um=1.0)


def test_a_huge_wafer_is_built_in_bounded_memory() -> None:
    # which dies lie wholly on the wafer is found row by row of dies: all at once, a 1 m
    # wafer of 1 mm dies took about 1.7 GB here, and a recipe's 20 m wafer was killed for
    # memory before the plan's size could be refused in one line
    tracemalloc.start()
    try:
        wafer = make_sample("wafer", diameter_mm=1000, die_pitch_mm=(1, 1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200e6
    valid = wafer._valid_dies()[0]
    assert valid.shape == (1000, 1000) and 0.7 < valid.mean() < 0.79  # about pi / 4 of the grid


@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_an_image_with_negative_pixels_is_refused_not_clipped_to_black(tmp_path, dtype):
    from typer.testing import CliRunner

    from scanner.cli import app

    # a float picture centred on 0 (-0.26..0.21), an int16 one all below 0: both were
    # clipped to black by the camera's rendering without a word
    pic = _picture()
    data = (pic - 0.55).astype(np.float32) if dtype == "float32" else (
        pic * 120 - 200).astype(np.int16)
    assert data.min() < 0
    tifffile.imwrite(tmp_path / "neg.tif", data)
    with pytest.raises(ValueError, match="negative pixel values"):
        ImageSample(tmp_path / "neg.tif", pixel_size_um=1.0)
    recipe = tmp_path / "neg.yaml"
    recipe.write_text("sample: {kind: image, path: neg.tif, pixel_size_um: 1.0}\n"
                      "microscope: {kind: simulated, camera: {width: 64, height: 64}}\n")
    res = CliRunner().invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: neg.yaml: sample.path:") \
        and "negative pixel values" in lines[0], lines


# ----------------------------------------------------------------------------- design seed

#: small samples of each kind with a design, and a region (x0, y0, pixel µm) of their design
DESIGNED = {
    "wafer": ({"kind": "wafer", "diameter_mm": 20.0, "die_pitch_mm": [2.0, 2.0],
               "edge_exclusion_mm": 1.0}, (-1500.0, -1500.0, 10.0)),
    "rectangle": ({"kind": "rectangle", "width_mm": 3.0, "height_mm": 3.0},
                  (-1000.0, -1000.0, 10.0)),
    "pv_cell": ({"kind": "pv_cell", "width_mm": 20.0, "height_mm": 20.0, "busbars": 2},
                (-6000.0, -6000.0, 100.0)),
}
SHAPE = (64, 96)
#: a defects seed whose 4 defects all lie away from the kind's design region (design_seed 42)
CLEAR_SEED = {"wafer": 5, "rectangle": 4, "pv_cell": 5}


def _recipe_sample(kind: str, count: int, seed: int, **keys):
    """The simulator's sample of a parsed recipe, as a scan builds it."""
    from devices.sample_factory import sample_for_recipe
    from scanner.recipe import parse_recipe

    spec = {**DESIGNED[kind][0], **keys, "defects": {"count": count, "seed": seed}}
    return sample_for_recipe(parse_recipe({"sample": spec}, Path("."), "t").sample)


def _design_region(sample, kind: str) -> np.ndarray:
    x0, y0, p = DESIGNED[kind][1]
    return sample.render(x0, y0, SHAPE, p)


def _clear_of_defects(sample, kind: str) -> bool:
    """Whether no defect of the sample comes near the design region."""
    x0, y0, p = DESIGNED[kind][1]
    x1, y1 = x0 + SHAPE[1] * p, y0 + SHAPE[0] * p
    m = 5 * p
    return all(b[2] < x0 - m or b[0] > x1 + m or b[3] < y0 - m or b[1] > y1 + m
               for b in (d.bbox_um for d in sample.defects()))


@pytest.mark.parametrize("kind", list(DESIGNED))
def test_without_design_seed_the_defects_seed_still_sets_the_design(kind):
    old = _design_region(_recipe_sample(kind, 0, 4), kind)
    assert "design_seed" not in _recipe_sample(kind, 0, 4).truth()["sample"]
    # as before: another defects seed, another design
    assert not np.array_equal(old, _design_region(_recipe_sample(kind, 0, 5), kind))
    # design_seed equal to the defects seed is the old sample exactly
    same = _recipe_sample(kind, 0, 4, design_seed=4)
    np.testing.assert_array_equal(old, _design_region(same, kind))


@pytest.mark.parametrize("kind", list(DESIGNED))
def test_copies_with_one_design_seed_share_their_design_whatever_their_defects(kind):
    golden = _recipe_sample(kind, 0, 1, design_seed=42)
    seed = CLEAR_SEED[kind]
    defective = _recipe_sample(kind, 4, seed, design_seed=42)
    other = _recipe_sample(kind, 4, seed + 1, design_seed=42)
    assert len(defective.defects()) == 4
    assert _clear_of_defects(defective, kind)
    np.testing.assert_array_equal(_design_region(golden, kind),
                                  _design_region(defective, kind))
    # the defects still come from defects.seed, and another design_seed is another product
    assert [d.to_dict() for d in defective.defects()] != [d.to_dict() for d in other.defects()]
    assert not np.array_equal(_design_region(golden, kind),
                              _design_region(_recipe_sample(kind, 0, 1, design_seed=43), kind))
    truth = json.loads(json.dumps(defective.truth()))
    assert truth["sample"]["design_seed"] == 42 and truth["sample"]["seed"] == seed


def test_design_seed_is_checked_and_only_where_a_sample_has_a_design(tmp_path):
    from scanner.errors import RecipeError
    from scanner.recipe import parse_recipe

    with pytest.raises(RecipeError, match="sample.design_seed"):
        parse_recipe({"sample": {**DESIGNED["wafer"][0], "design_seed": -1}}, tmp_path)
    # an image's design is its file: the seed only places its defects
    tifffile.imwrite(tmp_path / "a.tif", _texture((40, 50), seed=2))
    with pytest.raises(RecipeError, match="sample.design_seed"):
        parse_recipe({"sample": {"kind": "image", "path": "a.tif", "pixel_size_um": 1.0,
                                 "design_seed": 1}}, tmp_path)
