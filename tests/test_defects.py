"""Defect extraction on synthetic anomaly maps: threshold, merging, minimum size, classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.draw import disk, line, rectangle

from scanner.inspection.defects import (
    MapGeometry,
    classify,
    extract_defects,
    join_line_pieces,
    local_thresholds,
    shape_features,
)

GEOM = MapGeometry(origin_um=(100.0, 200.0), pixel_size_um=4.0, stride=4)


def _maps(anomaly: np.ndarray) -> dict[str, np.ndarray]:
    return {"anomaly": anomaly.astype(np.float32),
            "roughness": np.full(anomaly.shape, 2.0, np.float32),
            "uncertainty": np.full(anomaly.shape, 0.01, np.float32)}


def _image_from(anomaly_mask: np.ndarray, contrast: float, stride: int = 4):
    """Relative reflectance on the model grid: flat surface with the mask's pixels changed."""
    img = np.kron(anomaly_mask.astype(np.float32), np.ones((stride, stride))) * contrast
    img += np.random.default_rng(0).normal(0, 0.01, img.shape)
    return _reader(img)


def _reader(image: np.ndarray):
    """``image(r0, c0, h, w)`` of :func:`extract_defects`: zeros outside ``image``."""

    def read(r0: int, c0: int, h: int, w: int) -> np.ndarray:
        out = np.zeros((h, w), np.float32)
        a0, b0 = max(r0, 0), max(c0, 0)
        a1, b1 = min(r0 + h, image.shape[0]), min(c0 + w, image.shape[1])
        if a0 < a1 and b0 < b1:
            out[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = image[a0:a1, b0:b1]
        return out

    return read


def test_fragments_of_a_scratch_are_one_defect_and_classed_scratch():
    a = np.zeros((120, 200), np.float32)
    rr, cc = line(60, 10, 70, 190)
    a[rr, cc] = 0.9
    a[:, 70:72] = 0  # two gaps (2 map px = 8 model px) break the line into three fragments
    a[:, 130:132] = 0
    defects = extract_defects(_maps(a), GEOM, threshold=0.5, merge_px=16)
    assert len(defects) == 1
    d = defects[0]
    assert d.defect_class == "scratch"
    assert d.size_um == pytest.approx(180 * 4, rel=0.05)
    assert d.score == pytest.approx(0.9)
    # without merging the fragments stay apart
    assert len(extract_defects(_maps(a), GEOM, threshold=0.5, merge_px=0,
                               merge_lines=False)) == 3


def test_pieces_of_one_line_are_joined_across_a_long_gap_and_other_lines_are_not():
    a = np.zeros((160, 300), np.float32)
    for c0, c1 in [(10, 60), (100, 150)]:  # one scratch, its middle 40 map px too faint
        rr, cc = line(40 + c0 // 10, c0, 40 + c1 // 10, c1)
        a[rr, cc] = 0.9
    rr, cc = line(100, 10, 100, 60)  # parallel to it but 55 px away: another defect
    a[rr, cc] = 0.9
    rr, cc = line(110, 100, 150, 110)  # across the first line's direction
    a[rr, cc] = 0.9
    rr, cc = line(90, 200, 100, 290)  # the first line's direction, 30 px off its axis
    a[rr, cc] = 0.9
    defects = extract_defects(_maps(a), GEOM, threshold=0.5)
    assert len(defects) == 4
    joined = max(defects, key=lambda d: d.size_um)
    assert joined.size_um == pytest.approx(math.hypot(140, 14) * 4, rel=0.05)
    assert len(extract_defects(_maps(a), GEOM, threshold=0.5, merge_lines=False)) == 5


def test_threshold_min_size_and_hysteresis():
    a = np.zeros((100, 100), np.float32)
    a[20, 20] = 0.9  # one map pixel = 16 model px: kept with the default minimum (4 px)
    a[rr := slice(50, 60), slice(50, 60)] = 0.3  # below the threshold everywhere: not a defect
    a[rr, slice(80, 90)] = 0.3
    a[55, 85] = 0.8  # ... unless it peaks above it: the whole low region is its extent
    defects = extract_defects(_maps(a), GEOM, threshold=0.5, low=0.25)
    assert len(defects) == 2
    big = max(defects, key=lambda d: d.area_um2)
    assert big.area_um2 == pytest.approx(100 * 16.0)
    assert big.review is False
    assert len(extract_defects(_maps(a), GEOM, threshold=0.5, low=0.25, min_area_px=20)) == 1
    assert extract_defects(_maps(a), GEOM, threshold=0.95) == []


def test_centre_bbox_and_stage_coordinates():
    a = np.zeros((80, 80), np.float32)
    rr, cc = disk((30.0, 50.0), 4)
    a[rr, cc] = 0.9
    d = extract_defects(_maps(a), GEOM, threshold=0.5)[0]
    assert d.x_um == pytest.approx(100 + 50 * 4, abs=0.5)
    assert d.y_um == pytest.approx(200 + 30 * 4, abs=0.5)
    xmin, ymin, xmax, ymax = d.bbox_um
    assert xmin < d.x_um < xmax and ymin < d.y_um < ymax
    assert d.roughness == pytest.approx(2.0)
    assert d.uncertainty == pytest.approx(0.01)


@pytest.mark.parametrize("contrast, rim, expected", [
    (0.8, 0.0, "particle"), (-0.8, 0.0, "particle"), (-0.8, 0.25, "pit"),
    (0.8, -0.25, "particle"), (-0.8, 0.02, "particle")])
def test_small_round_blob_is_a_pit_when_dark_with_a_bright_rim(contrast, rim, expected):
    # a dark spot is a particle (it scatters light away) unless the light its slope sends back
    # rings it: the rim of a pit
    a = np.zeros((80, 80), np.float32)
    mask = np.zeros_like(a, dtype=bool)
    mask[disk((40, 40), 6)] = True  # the map's blurred region holds the whole spot
    a[mask] = 0.9
    img = np.zeros((320, 320), np.float32)
    dist = np.hypot(*(np.mgrid[:320, :320] - 161.5))
    img[dist <= 16] = contrast
    img[(dist > 16) & (dist <= 18)] = rim * abs(contrast)
    img += np.random.default_rng(0).normal(0, 0.01, img.shape)
    d = extract_defects(_maps(a), GEOM, threshold=0.5, image=_reader(img))[0]
    assert d.defect_class == expected


def test_branched_line_is_crack_and_rectangle_is_pattern():
    m = np.zeros((200, 200), bool)
    for r0, c0, r1, c1 in [(100, 10, 100, 190), (100, 100, 20, 140), (100, 60, 180, 30)]:
        rr, cc = line(r0, c0, r1, c1)
        m[rr, cc] = True
    assert classify_mask(m) == "crack"
    m = np.zeros((60, 60), bool)
    rr, cc = rectangle((20, 20), extent=(10, 14))
    m[rr, cc] = True
    assert classify_mask(m) == "pattern"


def test_large_faint_irregular_region_is_stain():
    rng = np.random.default_rng(2)
    from scipy import ndimage

    m = ndimage.gaussian_filter(rng.random((120, 120)), 8) > 0.5
    m = ndimage.binary_opening(m, iterations=2)
    lab, _ = ndimage.label(m)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    m = lab == sizes.argmax()
    a = np.where(m, 0.9, 0).astype(np.float32)
    d = extract_defects(_maps(a), GEOM, threshold=0.5, merge_px=0,
                        image=_image_from(m, -0.03))
    assert max(d, key=lambda x: x.area_um2).defect_class == "stain"


def test_uncertain_defects_are_flagged_for_review():
    a = np.zeros((60, 60), np.float32)
    a[disk((20, 20), 3)] = 0.9
    a[disk((40, 40), 3)] = 0.9
    maps = _maps(a)
    maps["uncertainty"][30:, 30:] = 0.9  # bits: above the default review level
    defects = sorted(extract_defects(maps, GEOM, threshold=0.5), key=lambda d: d.x_um)
    assert [d.review for d in defects] == [False, True]


def classify_mask(mask: np.ndarray) -> str:
    from scanner.inspection.defects import Features

    f = shape_features(mask)
    return classify(Features(**{k: v for k, v in f.items() if k != "feret"},
                             contrast=float("nan"), snr=float("nan")))


def test_centre_is_refined_on_the_full_resolution_image():
    a = np.zeros((80, 80), np.float32)
    a[disk((30.0, 50.0), 3)] = 0.9
    img = np.random.default_rng(1).normal(0, 0.01, (320, 320)).astype(np.float32)
    true_r, true_c = 30 * 4 + 1.5 + 2.0, 50 * 4 + 1.5 - 3.0  # model-grid pixels
    img[disk((true_r, true_c), 3.5)] += 0.5

    def read(r0, c0, h, w):
        return img[r0:r0 + h, c0:c0 + w] if r0 >= 0 and c0 >= 0 else np.zeros((h, w))

    d = extract_defects(_maps(a), GEOM, threshold=0.5, image=read)[0]
    # stage = map origin + map px * 4 µm; map px = (grid px - 1.5) / 4
    assert d.x_um == pytest.approx(100 + (true_c - 1.5), abs=0.6)
    assert d.y_um == pytest.approx(200 + (true_r - 1.5), abs=0.6)


def test_a_feature_beside_a_defect_in_its_map_region_does_not_pull_its_centre_or_box():
    # the map's region (blurred by the network) holds a 40 x 16 px dark defect and, 30 px
    # away, a smaller dark feature of half its contrast: a die's mark beside a missing pattern
    a = np.zeros((80, 80), np.float32)
    a[rectangle((24, 30), end=(44, 50))] = 0.9
    img = np.random.default_rng(3).normal(0, 0.01, (320, 320)).astype(np.float32)
    img[130:170, 150:166] -= 0.5  # the defect: centre (149.5, 157.5) on the model grid
    diff = img.copy()  # the neighbouring dies have the feature: their difference does not
    img[104:112, 184:192] -= 0.2  # the feature beside it
    z = np.zeros_like(img)
    z[130:170, 150:166] = 30.0

    def difference(r0, c0, h, w):
        return _reader(diff)(r0, c0, h, w), _reader(z)(r0, c0, h, w)

    for how in ({"image": _reader(img)}, {"difference": difference}):
        d = extract_defects(_maps(a), GEOM, threshold=0.5, **how)[0]
        assert d.x_um == pytest.approx(100 + 157.5 - 1.5, abs=1.0), how
        assert d.y_um == pytest.approx(200 + 149.5 - 1.5, abs=1.0), how
    # on a die-to-die difference the box is the defect's own, not the blurred region's
    x0, y0, x1, y1 = d.bbox_um
    assert x1 - x0 == pytest.approx(16, abs=2) and y1 - y0 == pytest.approx(40, abs=2)
    assert d.area_um2 == pytest.approx(16 * 40, rel=0.1)


def test_curved_scratch_centre_lies_on_the_scratch():
    a = np.zeros((120, 120), np.float32)
    t = np.linspace(-1.2, 1.2, 400)
    rr = np.round(60 + 50 * np.sin(t)).astype(int)
    cc = np.round(30 + 40 * np.cos(t)).astype(int)
    a[rr, cc] = 0.9
    a = np.maximum(a, ndimage_grey_dilate(a))
    d = extract_defects(_maps(a), GEOM, threshold=0.5)[0]
    assert d.defect_class == "scratch"
    r, c = (d.y_um - 200) / 4, (d.x_um - 100) / 4
    assert a[int(round(r)), int(round(c))] > 0  # on the line, not at the chord's middle


def ndimage_grey_dilate(a):
    from scipy import ndimage

    return ndimage.grey_dilation(a, size=(2, 2))


def test_extent_threshold_stays_above_a_busy_surface():
    from scanner.inspection.defects import extent_threshold

    rng = np.random.default_rng(0)
    quiet = rng.uniform(0.0, 0.05, (100, 100))
    busy = rng.uniform(0.3, 0.4, (100, 100))
    assert extent_threshold(quiet, 0.6) == pytest.approx(0.3125, abs=0.01)
    assert extent_threshold(busy, 0.6) == pytest.approx(0.475, abs=0.01)
    # a defect on the busy surface keeps its own extent instead of flooding the surface
    busy[40:50, 40:50] = 0.9
    d = extract_defects(_maps(busy.astype(np.float32)), GEOM, threshold=0.6)
    assert len(d) == 1 and d[0].area_um2 == pytest.approx(100 * 16.0)


def test_a_defects_uncertainty_is_read_at_its_peak():
    a = np.zeros((60, 60), np.float32)
    a[disk((30, 30), 8)] = 0.6
    a[30, 30] = 0.95
    maps = _maps(a)
    maps["uncertainty"][:] = 0.9  # an uncertain fringe everywhere ...
    maps["uncertainty"][30, 30] = 0.2  # ... but confident where the defect peaks
    (d,) = extract_defects(maps, GEOM, threshold=0.5)
    assert d.score == pytest.approx(0.95) and d.uncertainty == pytest.approx(0.2)


def test_only_defects_barely_above_a_high_threshold_are_borderline():
    from scanner.inspection.defects import is_borderline

    assert is_borderline(0.55, 0.5) and not is_borderline(0.6, 0.5)
    # a high calibrated threshold: a confident defect is not borderline
    assert not is_borderline(0.99, 0.935) and is_borderline(0.94, 0.935)
    a = np.zeros((60, 60), np.float32)
    a[disk((30, 30), 4)] = 0.99
    (d,) = extract_defects(_maps(a), GEOM, threshold=0.935)
    assert not d.review


def _busy_and_quiet(shape=(160, 320), seed=0) -> np.ndarray:
    """Left half: busy structure (many moderate peaks); right half: a quiet surface."""
    rng = np.random.default_rng(seed)
    a = np.full(shape, 0.005, np.float32)
    busy = rng.uniform(0.0, 0.25, (shape[0], shape[1] // 2)).astype(np.float32)
    a[:, : shape[1] // 2] = busy
    return a


def test_quiet_mask_follows_the_surface_not_a_small_defect():
    from models.thresholds import quiet_mask

    a = _busy_and_quiet()
    a[70:78, 250:262] = 0.6  # a defect on the quiet side
    q = quiet_mask(a)
    assert not q[:, :120].any()  # busy structure
    assert q[:, 200:].all()  # quiet, defect included
    # pixels outside the inspected area (0) do not make their neighbours quiet
    b = np.full((160, 160), 0.005, np.float32)
    b[:, :80] = 0.0
    assert not quiet_mask(b)[:, :72].any() and quiet_mask(b)[:, 100:].all()


def test_quiet_threshold_finds_a_faint_defect_on_the_quiet_surface_only():
    from models.thresholds import quiet_mask

    a = _busy_and_quiet()
    a[40:46, 240:246] = 0.6  # faint defect, quiet side
    a[40:46, 60:66] = 0.6  # same, inside the busy structure
    quiet = quiet_mask(a)
    local = local_thresholds(0.9, [(quiet, 0.5)], a.shape)
    found = extract_defects(_maps(a), GEOM, threshold=0.9, local_threshold=local)
    assert len(found) == 1
    x_map = (found[0].x_um - GEOM.origin_um[0]) / GEOM.pixel_size_um
    assert 238 <= x_map <= 248
    # without the quiet threshold (or with one above the threshold) neither is found
    assert extract_defects(_maps(a), GEOM, threshold=0.9) == []
    assert local_thresholds(0.9, [(quiet, 0.95)], a.shape) is None


def test_local_thresholds_take_the_lowest_context_that_applies():
    shape = (4, 6)
    quiet = np.zeros(shape, bool)
    quiet[:, 2:] = True
    plain = np.zeros(shape, bool)
    plain[:, 4:] = True
    t = local_thresholds(0.9, [(quiet, 0.7), (plain, 0.3)], shape)
    assert np.allclose(t[:, :2], 0.9) and np.allclose(t[:, 2:4], 0.7)
    assert np.allclose(t[:, 4:], 0.3)
    # order does not matter; a context above the threshold or without one changes nothing
    assert np.array_equal(t, local_thresholds(0.9, [(plain, 0.3), (quiet, 0.7),
                                                    (quiet, None), (plain, 0.95)], shape))


def _plain_surface(shape=(96, 192), seed=0) -> np.ndarray:
    """Relative reflectance at map resolution: left a patterned die (pads, dense wiring),
    right plain."""
    rng = np.random.default_rng(seed)
    img = (1.0 + rng.normal(0, 0.004, shape)).astype(np.float32)
    for r in range(4, shape[0] - 12, 24):
        img[r : r + 10, 8:18] = 1.6  # pads
    for r in range(0, shape[0], 4):
        img[r : r + 2, 24:80] = 0.7  # wiring at half coverage
    return img


def test_plain_mask_keeps_a_thin_scratch_plain_and_structure_not():
    from models.thresholds import map_resolution, plain_mask

    img = _plain_surface()
    img[50:52, 120:180] = 1.25  # a thin scratch on the plain side
    m = plain_mask(img)
    assert not m[:, :80].any()  # the die's structure
    assert m[:, 160:].all()  # plain, the scratch's own neighbourhood included
    # a rough surface is not plain; a uniform level change (no texture) is
    rng = np.random.default_rng(1)
    rough = (1.0 + rng.normal(0, 0.08, (96, 96))).astype(np.float32)
    assert not plain_mask(rough).any()
    assert plain_mask(np.full((96, 96), 0.4, np.float32)).all()
    # a stain bigger than half a block makes its own neighbourhood not plain
    stain = _plain_surface()
    stain[40:60, 130:150] = 0.85
    assert not plain_mask(stain)[50, 140]
    # map resolution: mean of stride x stride pixels, padded to the map's shape
    big = np.arange(36, dtype=np.float32).reshape(6, 6)
    pooled = map_resolution(big, 4, (2, 2))
    assert pooled.shape == (2, 2) and pooled[0, 0] == big[:4, :4].mean()


def _blurred_footprint(image: np.ndarray, stride: int = 4, grow: int = 1) -> np.ndarray:
    """What the anomaly map makes of an image defect: its map pixels, grown by ``grow``
    (the network's response is blurred over a map pixel or two), as scores of 0.9."""
    from scipy import ndimage

    h, w = image.shape
    hit = np.abs(image).reshape(h // stride, stride, w // stride, stride).max(axis=(1, 3)) > 0.05
    return np.where(ndimage.binary_dilation(hit, iterations=grow), 0.9, 0.0).astype(np.float32)


def _classify_image_defect(draw) -> str:
    """Class of the one defect drawn (relative reflectance) on a noisy flat 320 px image."""
    img = np.zeros((320, 320), np.float32)
    draw(img)
    anomaly = _blurred_footprint(img)
    img += np.random.default_rng(3).normal(0, 0.01, img.shape).astype(np.float32)
    defects = extract_defects(_maps(anomaly), GEOM, threshold=0.5, image=_reader(img))
    assert len(defects) == 1
    return defects[0].defect_class


def test_short_thin_scratch_is_a_scratch_though_its_map_blur_is_compact():
    # 23 px long, 1 px wide: on the map (4 px per map pixel, blurred by one) a compact blob
    def draw(img):
        rr, cc = line(150, 150, 166, 166)
        img[rr, cc] = -0.3

    assert _classify_image_defect(draw) == "scratch"


def test_winding_thin_line_is_a_crack():
    def draw(img):
        t = np.linspace(0, 1, 400)
        rr = (100 + 120 * t).astype(int)
        cc = (160 + 25 * np.sin(t * 4 * np.pi)).astype(int)
        img[rr, cc] = -0.4

    assert _classify_image_defect(draw) == "crack"


def test_rectangle_on_the_image_is_a_pattern_defect_though_its_map_blur_is_round():
    def draw(img):
        img[140:164, 130:146] = -0.3

    assert _classify_image_defect(draw) == "pattern"


@pytest.mark.parametrize("contrast, expected", [(-0.15, "stain"), (0.2, "stain"),
                                                (-0.7, "particle"), (0.7, "particle")])
def test_large_round_defect_is_a_stain_when_faint_and_a_particle_or_pit_when_opaque(
        contrast, expected):
    # contrast in units of the surface level: a residue changes reflectance by tens of per
    # cent, an opaque particle or a deep pit by more
    def draw(img):
        img[disk((160, 160), 20)] = contrast

    assert _classify_image_defect(draw) == expected


def test_a_crack_seen_on_the_image_as_one_straight_piece_is_still_a_crack():
    # the map holds the whole branched crack; on the image only its main branch stands out
    # (the branches fade into the surface): the footprint is a straight line
    a = np.zeros((100, 120), np.float32)
    for r0, c0, r1, c1 in [(50, 10, 50, 110), (50, 60, 15, 85), (50, 40, 85, 20)]:
        rr, cc = line(r0, c0, r1, c1)
        a[rr, cc] = 0.9
    img = np.zeros((400, 480), np.float32)
    rr, cc = line(201, 40, 201, 440)
    img[rr, cc] = -0.5
    img[rr + 1, cc] = -0.5
    img += np.random.default_rng(1).normal(0, 0.01, img.shape).astype(np.float32)
    d = extract_defects(_maps(a), GEOM, threshold=0.5, image=_reader(img))
    assert len(d) == 1 and d[0].defect_class == "crack"
    # the same footprint under a straight region on the map: a scratch
    a = np.zeros((100, 120), np.float32)
    a[50, 10:111] = 0.9
    d = extract_defects(_maps(a), GEOM, threshold=0.5, image=_reader(img))
    assert len(d) == 1 and d[0].defect_class == "scratch"


def test_a_region_the_neighbouring_dies_repeat_is_design_not_a_defect():
    # two regions the network flags; the die-to-die difference shows only the second
    a = np.zeros((80, 160), np.float32)
    a[disk((40, 40), 5)] = 0.9
    a[disk((40, 120), 5)] = 0.9
    img = np.zeros((320, 640), np.float32)
    img[disk((161.5, 161.5), 14)] = -0.6  # a dark design feature, in every die
    img[disk((161.5, 481.5), 14)] = -0.6
    noise = np.random.default_rng(2).normal(0, 0.01, img.shape).astype(np.float32)
    diff = noise.copy()
    diff[disk((161.5, 481.5), 8)] -= 0.5  # a particle on the second feature
    z = np.zeros_like(img)
    z[disk((161.5, 481.5), 8)] = 30.0

    def difference(r0, c0, h, w):
        return _reader(diff)(r0, c0, h, w), _reader(z)(r0, c0, h, w)

    found = extract_defects(_maps(a), GEOM, threshold=0.5, image=_reader(img + noise),
                            difference=difference)
    assert len(found) == 1 and found[0].x_um > GEOM.origin_um[0] + 400
    assert found[0].defect_class == "particle"
    # without the comparison both are reported
    assert len(extract_defects(_maps(a), GEOM, threshold=0.5, image=_reader(img + noise))) == 2


def test_extent_threshold_is_raised_where_the_surface_scores_high():
    # a busy die (the map near 1.0) beside plain surface (near 0.47): defects in the die
    # must not flood through it and join into one box
    from scanner.inspection.defects import (
        MapGeometry,
        extent_threshold,
        extract_defects,
        local_extent_thresholds,
    )

    rng = np.random.default_rng(0)
    an = (0.45 + 0.05 * rng.random((256, 256))).astype(np.float32)
    an[:, 192:] = (0.85 + 0.3 * rng.random((256, 64))).astype(np.float32)  # the die
    an[40:44, 200:204] = 1.6  # two small defects in the die, far apart
    an[200:204, 240:244] = 1.6
    thr = 1.3
    low = extent_threshold(an, thr)
    blocks = local_extent_thresholds(an, thr, low)
    assert blocks.shape == (8, 8)
    assert np.all(blocks[:, :4] == pytest.approx(low))  # plain: the map-wide one
    assert np.all(blocks[:, 6:] > low + 0.2)  # the die: halfway from 1.0 to the threshold
    maps = {"anomaly": an, "roughness": np.zeros_like(an), "uncertainty": np.zeros_like(an)}
    geometry = MapGeometry((0.0, 0.0), 4.0, 4)
    found = extract_defects(maps, geometry, threshold=thr)
    assert len(found) == 2 and all(d.bbox_um[2] - d.bbox_um[0] < 40 for d in found)
    # one extent threshold for the whole map floods the die: boxes over the whole die (one
    # region, shared between the two defects: they lie farther apart than the merging gap)
    flooded = extract_defects(maps, geometry, threshold=thr, low=low)
    assert any(d.bbox_um[2] - d.bbox_um[0] > 200 for d in flooded)


def test_a_region_across_dies_that_the_dies_repeat_is_design_not_a_defect():
    # a chain of design features over three dies, joined by the extent threshold: no one
    # die's difference covers its window, so the map of what the dies repeat decides
    a = np.zeros((60, 160), np.float32)
    a[28:32, 10:150] = 0.4  # over the extent threshold only
    for c in (20, 70, 120):
        a[26:34, c:c + 8] = 0.9  # over the threshold: the same feature in every die
    compared = np.ones(a.shape, bool)
    repeated = compared.copy()
    assert extract_defects(_maps(a), GEOM, threshold=0.5, low=0.3,
                           dies=(compared, repeated)) == []
    # where the dies differ (a defect on one copy of the feature) that copy is the defect,
    # without the chain of design around it
    repeated[26:34, 70:78] = False
    found = extract_defects(_maps(a), GEOM, threshold=0.5, low=0.3, dies=(compared, repeated))
    assert len(found) == 1
    x0, y0, x1, y1 = found[0].bbox_um
    assert (x0, x1) == pytest.approx((100 + 69.5 * 4, 100 + 77.5 * 4))
    assert (y0, y1) == pytest.approx((200 + 25.5 * 4, 200 + 33.5 * 4))
    # over the threshold outside the dies compared (a street): not the dies' to judge
    repeated[26:34, 70:78] = True
    compared[26:34, 120:128] = repeated[26:34, 120:128] = False
    assert len(extract_defects(_maps(a), GEOM, threshold=0.5, low=0.3,
                               dies=(compared, repeated))) == 1


def test_repeated_mask_is_the_compared_pixels_no_patch_scores_as_different():
    from scanner.inspection.dietodie import repeated_mask

    compared = np.zeros((10, 10), bool)
    compared[:, :6] = True
    patch = np.zeros((4, 4), np.float32)
    patch[1, 1] = 2.0
    out = repeated_mask(compared, [(2, 3, patch), (8, 8, np.full((4, 4), 5.0, np.float32))],
                        design_score=1.0)
    assert not out[3, 4] and out[2, 3] and out[5, 5] and not out[:, 6:].any()


def test_two_strong_defects_whose_blurred_tails_join_are_two_defects():
    """On a polished, nearly featureless part the network's blur of a defect scoring several
    times the threshold stays over the extent threshold far around it: two particles 24 map
    px apart were one box. Where the peak is that high, each is its own defect."""
    yy, xx = np.mgrid[0:64, 0:96]
    a = np.full((64, 96), 0.8, np.float32)
    for cy, cx, peak in ((32, 36, 5.0), (32, 60, 3.5)):
        a += peak * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 4.0**2))
    defects = sorted(extract_defects(_maps(a), GEOM, threshold=1.16), key=lambda d: d.x_um)
    assert len(defects) == 2
    for d, cx in zip(defects, (36, 60), strict=True):
        assert d.x_um == pytest.approx(100 + cx * 4.0, abs=4.0)
        assert d.y_um == pytest.approx(200 + 32 * 4.0, abs=4.0)
    # one strong defect stays one, and so does a faint pair (nothing over the threshold's
    # share of a high peak: their extent is as before)
    one = np.full((64, 96), 0.8, np.float32) + 5.0 * np.exp(
        -((yy - 32) ** 2 + (xx - 48) ** 2) / (2 * 6.0**2))
    assert len(extract_defects(_maps(one), GEOM, threshold=1.16)) == 1


def test_a_small_piece_beyond_a_lines_end_on_its_axis_joins_the_line():
    """A scratch crossing a dark street loses a stretch; its last few pixels beyond the gap
    are too short to have a direction and were reported as a "particle" of their own. A
    piece as far off the axis stays apart."""
    a = np.zeros((60, 80), np.float32)
    a[rectangle((29, 10), end=(30, 39))] = 0.9  # the line: rows 29-30, columns 10-39
    a[29:31, 48:50] = 0.9  # 8 px beyond its end, on its axis
    a[44:46, 48:50] = 0.9  # as far on, 15 px off the axis
    defects = extract_defects(_maps(a), GEOM, threshold=0.5, merge_px=24)
    assert len(defects) == 2
    line = max(defects, key=lambda d: d.bbox_um[2] - d.bbox_um[0])
    assert line.bbox_um[2] == pytest.approx(100 + 49.5 * 4.0)


def test_a_missing_patterns_centre_is_that_of_its_whole_difference():
    """A missing pattern's die-to-die difference is the design it lacks, strongest where that
    was brightest: a bright edge along one side of the hole drew the centre there (a 32 px
    hole of a photograph die grid: 9 px off). The centre is that of the whole clear
    deviation joined to it."""
    a = np.zeros((80, 80), np.float32)
    a[rectangle((34, 34), end=(43, 42))] = 0.9
    diff = np.random.default_rng(4).normal(0, 0.01, (320, 320)).astype(np.float32)
    diff[140:172, 138:166] -= 0.3  # the hole: centre (155.5, 151.5) on the model grid
    diff[140:172, 160:166] -= 0.5  # where the design was brightest: its right edge
    z = np.zeros_like(diff)
    z[140:172, 138:166] = 30.0

    def difference(r0, c0, h, w):
        return _reader(diff)(r0, c0, h, w), _reader(z)(r0, c0, h, w)

    d = extract_defects(_maps(a), GEOM, threshold=0.5, difference=difference)[0]
    assert d.x_um == pytest.approx(100 + 151.5 - 1.5, abs=3.0)
    assert d.y_um == pytest.approx(200 + 155.5 - 1.5, abs=3.0)


def test_a_scratch_whose_contrast_varies_along_it_is_one_defect():
    """A scratch strong in places and faint between them holds several strong groups; cut
    between them its pieces are short and broad and were reported as two or three defects
    (a 335 um scratch on the simulated coupon: three)."""
    from scipy import ndimage

    a = np.zeros((80, 120), np.float32)
    rr, cc = line(12, 10, 66, 105)
    t = np.linspace(0, 1, rr.size)
    # strong at both ends and faint in the middle, gently bent
    a[rr + (6 * np.sin(np.pi * t)).astype(int), cc] = 1.0 + 5.0 * np.cos(3 * np.pi * t) ** 2
    a = ndimage.gaussian_filter(a, 1.5) * 6 + 0.8
    (d,) = extract_defects(_maps(a), GEOM, threshold=1.16)
    assert d.bbox_um[0] <= 100 + 10 * 4.0 and d.bbox_um[2] >= 100 + 105 * 4.0


def test_line_pieces_join_end_to_end_only():
    """Pieces of one line join; pieces side by side, at a right angle or compact do not."""
    from skimage.morphology import dilation
    from skimage.morphology import disk as disk_footprint

    def pieces(*segments: tuple[int, int, int, int]) -> np.ndarray:
        out = np.zeros((120, 160), np.int32)
        for k, (r0, c0, r1, c1) in enumerate(segments, start=1):
            one = np.zeros(out.shape, bool)
            one[line(r0, c0, r1, c1)] = True
            out[dilation(one, disk_footprint(2)) & (out == 0)] = k
        return out

    def n_after(parts: np.ndarray) -> int:
        return len(np.unique(join_line_pieces(parts, parts)[parts > 0]))

    assert n_after(pieces((60, 10, 60, 50), (60, 51, 75, 90))) == 1  # in line, bent 20 deg
    assert n_after(pieces((60, 10, 60, 50), (61, 50, 100, 50))) == 2  # a right angle
    assert n_after(pieces((60, 10, 60, 50), (65, 30, 65, 70))) == 2  # side by side
    blobs = np.zeros((120, 160), np.int32)
    blobs[disk((60, 64), 12)] = 2
    blobs[disk((60, 40), 12)] = 1
    assert n_after(blobs) == 2  # two compact spots whose tails join


def _two_joined_by_their_tails(second: str) -> np.ndarray:
    """A map whose two groups of pixels over the threshold (0.5 x 2 and 1.2: a faint spot and
    a strong neighbour) lie 7 px apart (more than the 6 px merging gap), their blurred tails
    (0.8: over the extent threshold 0.6, under the decision one 1.2) joining them."""
    a = np.full((64, 80), 0.45, np.float32)
    a[26:40, 26:50] = 0.8  # the tails, one region of the extent threshold
    if second == "spot":
        a[disk((32, 30), 2.6, shape=a.shape)] = 2.3  # dark spot, 2 x the threshold
        a[disk((33, 44), 3.6, shape=a.shape)] = 2.4  # bright particle
    else:  # two pieces of one line with a gap of 8 px: a scratch that fades in a stretch
        a[32, 20:34] = 2.3
        a[32, 42:56] = 2.3
        a[26:40, 14:62] = np.maximum(a[26:40, 14:62], 0.8)
    return a


def test_two_defects_whose_tails_join_are_two_unless_they_lie_on_one_line():
    # probe p7 (ramp_cat): a dark spot 7 map px from a bright particle was one region with it
    # and reported as the particle only
    a = _two_joined_by_their_tails("spot")
    defects = sorted(extract_defects(_maps(a), GEOM, threshold=1.2, low=0.6),
                     key=lambda d: d.x_um)
    assert len(defects) == 2
    for d, (r, c) in zip(defects, [(32, 30), (33, 44)], strict=True):
        assert abs(d.x_um - (100.0 + 4.0 * c)) <= 4.0
        assert abs(d.y_um - (200.0 + 4.0 * r)) <= 4.0
    # a group in the lower half of the range over the threshold (here to 2.4) is the
    # neighbour's fringe or a faint piece of one extended defect (a PV stain's pieces at
    # 0.2-0.3 of the range were split off and called cracks): no defect of its own
    for faint in (1.3, 1.6):
        a[disk((32, 30), 2.6, shape=a.shape)] = faint
        (d,) = extract_defects(_maps(a), GEOM, threshold=1.2, low=0.6)
        assert d.score == pytest.approx(2.4)
    # pieces of one line stay one defect (merge_collinear), gap and joining tails alike
    (line_defect,) = extract_defects(_maps(_two_joined_by_their_tails("line")), GEOM,
                                     threshold=1.2, low=0.6)
    left, _, right, _ = line_defect.bbox_um
    assert left <= 100.0 + 4.0 * 21 and right >= 100.0 + 4.0 * 54  # both pieces in its box


def test_a_missing_pattern_in_a_grating_is_not_taken_for_the_design():
    """A grating finer than two pixels differs from references misaligned by a fraction of a
    pixel at full contrast everywhere: a missing pattern in it (z 22 die to die) stood out of
    that difference by 1.9 noise widths and was dropped as the dies' common design. Read
    over a pixel, the difference shows the hole alone."""
    a = np.zeros((80, 80), np.float32)
    a[rectangle((34, 34), end=(43, 42))] = 0.9
    diff = np.zeros((320, 320), np.float32)
    diff[:, ::2], diff[:, 1::2] = 0.3, -0.3  # the grating's residual (period 2 px)
    diff += np.random.default_rng(5).normal(0, 0.01, diff.shape).astype(np.float32)
    diff[140:172, 138:166] = -0.3  # the hole: the grating's mean level lost
    z = np.zeros_like(diff)
    z[140:172, 138:166] = 22.0

    def difference(r0, c0, h, w):
        return _reader(diff)(r0, c0, h, w), _reader(z)(r0, c0, h, w)

    (d,) = extract_defects(_maps(a), GEOM, threshold=0.5, difference=difference)
    assert d.x_um == pytest.approx(100 + 151.5 - 1.5, abs=4.0)
    # a design the neighbouring dies repeat, grating and all, stays dropped
    same = diff.copy()
    same[140:172, 138:166] = np.where(np.arange(28) % 2 == 0, 0.3, -0.3)[None, :]

    def repeated(r0, c0, h, w):
        return _reader(same)(r0, c0, h, w), _reader(z)(r0, c0, h, w)

    assert extract_defects(_maps(a), GEOM, threshold=0.5, difference=repeated) == []


@pytest.mark.parametrize("via", ["image", "difference"])
def test_a_cluster_of_separate_spots_is_one_defect_per_spot(via):
    """Four 9 px spots 20 px apart and a line of three 28 px apart are one region each on the
    map (the network's reach joins them), yet each spot is a particle of its own in a fab's
    defect list: one defect each, centred and boxed on it (probe P22: a 2 x 2 cluster was one
    "particle" boxed 48 x 48 px)."""
    a = np.zeros((100, 100), np.float32)
    a[rectangle((18, 18), end=(34, 34))] = 0.9  # model grid 72-136: the 2 x 2 cluster
    a[rectangle((60, 20), end=(68, 46))] = 0.9  # model grid 240-272 x 80-184: the line
    img = np.random.default_rng(5).normal(0, 0.01, (400, 400)).astype(np.float32)
    centres = [(94, 94), (94, 114), (114, 94), (114, 114), (256, 104), (256, 132), (256, 160)]
    for cy, cx in centres:
        img[disk((cy, cx), 4.5, shape=img.shape)] = -0.8
    if via == "image":
        found = extract_defects(_maps(a), GEOM, threshold=0.5, image=_reader(img))
    else:
        z = np.where(np.abs(img) > 0.1, 40.0, 0.0).astype(np.float32)

        def difference(r0, c0, h, w):
            return _reader(img)(r0, c0, h, w), _reader(z)(r0, c0, h, w)

        found = extract_defects(_maps(a), GEOM, threshold=0.5, difference=difference)
    assert len(found) == len(centres)
    for cy, cx in centres:
        d = min(found, key=lambda d: math.hypot(d.x_um - (100 + cx - 1.5),
                                                d.y_um - (200 + cy - 1.5)))
        assert math.hypot(d.x_um - (100 + cx - 1.5), d.y_um - (200 + cy - 1.5)) < 2.0
        x0, y0, x1, y1 = d.bbox_um
        assert 7 <= x1 - x0 <= 16 and 7 <= y1 - y0 <= 16
        assert d.defect_class in ("particle", "pit")


def test_a_stain_with_strong_parts_and_a_missing_pattern_stay_one_defect():
    """What deviates between its strongest parts is one defect: a stain whose strongest parts
    lie apart, a missing pattern whose difference is the design it lacks (two bright bands of
    it joined by a fainter one), and a large stain cut into quarters by a dark street."""
    a = np.zeros((100, 100), np.float32)
    a[rectangle((20, 20), end=(45, 45))] = 0.9
    img = np.random.default_rng(6).normal(0, 0.01, (400, 400)).astype(np.float32)
    img[disk((130, 130), 40, shape=img.shape)] -= 0.08
    img[disk((115, 115), 8, shape=img.shape)] -= 0.08
    img[disk((145, 145), 8, shape=img.shape)] -= 0.08
    assert len(extract_defects(_maps(a), GEOM, threshold=0.5, image=_reader(img))) == 1
    diff = np.random.default_rng(7).normal(0, 0.01, (400, 400)).astype(np.float32)
    diff[100:160, 100:160] -= 0.15
    diff[104:118, 104:118] -= 0.4
    diff[140:154, 140:154] -= 0.4
    z = np.zeros_like(diff)
    z[100:160, 100:160] = 30.0

    def difference(r0, c0, h, w):
        return _reader(diff)(r0, c0, h, w), _reader(z)(r0, c0, h, w)

    assert len(extract_defects(_maps(a), GEOM, threshold=0.5, difference=difference)) == 1
    # a large stain over a street crossing, where the dark street hides it: its four quarters
    # are compact and apart, yet far wider than a spot
    a = np.zeros((120, 120), np.float32)
    a[rectangle((15, 15), end=(100, 100))] = 0.9
    img = np.random.default_rng(8).normal(0, 0.01, (480, 480)).astype(np.float32)
    img[disk((230, 230), 150, shape=img.shape)] -= 0.2
    img[214:246, :] *= 0.1
    img[:, 214:246] *= 0.1
    found = extract_defects(_maps(a), GEOM, threshold=0.5, image=_reader(img))
    assert len(found) == 1


def test_a_scratch_cut_by_a_street_where_the_dies_repeat_stays_one_defect():
    """A long scratch crossing a street: where it crosses, it is faint and the compared dies
    repeat one another, so the region is cut outside those pixels; its two pieces lie on one
    line and are one defect (probe P22: a 555 um scratch over three dies was two)."""
    a = np.zeros((60, 200), np.float32)
    rr, cc = line(20, 10, 34, 190)  # a gentle slope, 180 map px long
    for dr in (-1, 0, 1):
        a[rr + dr, cc] = 0.9
    compared = np.ones(a.shape, bool)
    repeated = np.zeros(a.shape, bool)
    repeated[:, 120:131] = True  # the street and the dies' edges beside it
    found = extract_defects(_maps(a), GEOM, threshold=0.5, low=0.3, dies=(compared, repeated))
    assert len(found) == 1
    x0, _, x1, _ = found[0].bbox_um
    assert x0 <= 100 + 10 * 4 and x1 >= 100 + 190 * 4
    assert found[0].defect_class == "scratch"


def test_pieces_of_one_region_boxing_the_same_deviation_are_one_defect():
    """A large defect cut into parts on the map, each measured again on the image around it,
    boxes the same deviation twice (probe P22: a smudge over most of a die was a 212 x 208 um
    "crack" and a 132 x 132 um "particle" inside it): one defect, boxed over both, with the
    higher score. Pieces boxed apart (a cluster's spots) stay apart."""
    from scanner.defectlist import Defect
    from scanner.inspection.defects import merge_overlapping

    def defect(box, score, cls):
        return Defect(id=0, x_um=(box[0] + box[2]) / 2, y_um=(box[1] + box[3]) / 2,
                      bbox_um=box, area_um2=100.0, size_um=10.0, defect_class=cls,
                      score=score, roughness=0.0, uncertainty=0.1, review=False)

    big = defect((1022.0, 531.0, 1234.0, 739.0), 2.09, "stain")
    inner = defect((1106.0, 523.0, 1238.0, 655.0), 2.3, "particle")
    apart = defect((1300.0, 600.0, 1310.0, 610.0), 2.5, "particle")
    out = merge_overlapping([inner, apart, big])
    assert len(out) == 2
    (one,) = [d for d in out if d.defect_class == "stain"]
    assert one.bbox_um == (1022.0, 523.0, 1238.0, 739.0)
    assert one.score == 2.3
    assert merge_overlapping([apart]) == [apart]


def test_a_stain_across_a_street_is_boxed_over_both_dies():
    """A window reaching past its die: the other compared die's part of the difference (its
    z-scores NaN, the window's die decides), which ``Comparison.difference`` now fills in
    (tests/test_dietodie.py), boxes the defect too (probe P22: a 239 um stain across a
    street was boxed over its right 106 um, the part in the window's die)."""
    a = np.zeros((60, 100), np.float32)
    a[rectangle((20, 10), end=(40, 80))] = 0.9  # model grid rows 80-163, cols 40-323
    diff = np.random.default_rng(9).normal(0, 0.01, (240, 400)).astype(np.float32)
    diff[90:150, 50:290] -= 0.2  # the stain, model grid cols 50-289
    diff[:, 160:176] = 0.0  # the street: dark, it hides the stain
    z = np.where(diff < -0.1, 30.0, 1.0).astype(np.float32)

    def difference(r0, c0, h, w):
        d, zz = _reader(diff)(r0, c0, h, w), _reader(z)(r0, c0, h, w)
        cols = np.arange(c0, c0 + w)
        zz[:, cols < 176] = np.nan  # the other die: its z-scores are not the window's
        return d, zz

    (d,) = extract_defects(_maps(a), GEOM, threshold=0.5, difference=difference)
    x0, _, x1, _ = d.bbox_um
    assert x0 == pytest.approx(100 + 50 - 2, abs=6) and x1 == pytest.approx(100 + 290 - 2, abs=6)
