"""Small sharp defects on plain surface, at the mosaic's resolution
(scanner/inspection/plainspots.py)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from scanner.inspection.dietodie_geometry import MosaicGrid
from scanner.inspection.plainspots import plain_spot_patches, spot_change

LEVEL = 2000.0


def _surface(shape=(512, 512), noise=0.01, seed=0) -> np.ndarray:
    """Grey values of polished silicon: the level with 1 % pixel noise."""
    rng = np.random.default_rng(seed)
    return (LEVEL * (1.0 + rng.normal(0, noise, shape))).astype(np.float32)


def _disc(img, centre, radius, contrast):
    rr, cc = np.mgrid[:img.shape[0], :img.shape[1]]
    img[np.hypot(rr - centre[0], cc - centre[1]) <= radius] *= 1.0 + contrast


def _groups(found: np.ndarray) -> list[tuple[float, float]]:
    """Centres of the groups found, those a few pixels apart as one (at map resolution, 4
    pixels, they are one defect)."""
    labels, n = ndimage.label(ndimage.binary_dilation(found > 0, iterations=2),
                              structure=np.ones((3, 3)))
    return ndimage.center_of_mass(found > 0, labels, range(1, n + 1))


def test_particle_pit_and_thin_scratch_are_found_where_they_are():
    img = _surface()
    _disc(img, (100, 120), 4, -0.5)  # a dark particle 8 px across
    _disc(img, (300, 400), 2.5, -0.3)  # a pit 5 px across
    for k in range(150):  # a diagonal scratch one pixel wide, 20 % brighter
        img[200 + k, 150 + k] *= 1.2
    found = spot_change(img, np.ones(img.shape, bool), LEVEL)
    centres = _groups(found)
    assert len(centres) == 3
    for want in ((100, 120), (300, 400), (274.5, 224.5)):
        assert min(np.hypot(r - want[0], c - want[1]) for r, c in centres) < 3
    # the scratch is kept along its length, not cut into the few pixels of an opening
    assert np.count_nonzero(found[200:350, 150:300]) >= 120


def test_noise_seams_slow_shading_and_a_lone_hot_pixel_are_not_defects():
    img = _surface(seed=1)
    img[:, 256:] *= 1.04  # an exposure step of 4 % at a tile seam
    rr, cc = np.mgrid[:512, :512]
    img *= (1.0 - 0.1 * ((rr - 256) ** 2 + (cc - 256) ** 2) / 256**2).astype(np.float32)
    img[40, 40] = 4 * LEVEL  # a hot pixel
    assert not spot_change(img, np.ones(img.shape, bool), LEVEL).any()


def test_only_plain_pixels_are_judged_and_structure_edges_are_not_spots():
    from scanner.inspection.plainsurface import plain_surface_area

    img = _surface(seed=2)
    rng = np.random.default_rng(5)
    img[:, :200] = LEVEL * (0.5 + 0.3 * rng.random((512, 50)).repeat(4, axis=1))  # circuitry
    _disc(img, (100, 100), 4, 0.6)  # inside the structure: not plain, left to the others
    _disc(img, (300, 400), 4, -0.5)  # a particle on the plain part
    # the plain mask as the inspection makes it: at map resolution (4 x 4 means), by blocks
    pooled = img.reshape(128, 4, 128, 4).mean(axis=(1, 3)) / LEVEL
    plain = plain_surface_area(pooled, np.ones(pooled.shape, bool)).plain
    assert plain[:, 60:].all() and not plain[:, :40].any()  # blocks of 8 map pixels
    found = spot_change(img, plain.repeat(4, axis=0).repeat(4, axis=1), LEVEL)
    centres = _groups(found)
    assert len(centres) == 1 and np.hypot(centres[0][0] - 300, centres[0][1] - 400) < 2


def test_unscanned_pixels_are_never_compared():
    img = _surface(seed=3)
    img[-20:] = 0  # the last rows no tile covered
    assert not spot_change(img, np.ones(img.shape, bool), LEVEL).any()


def test_a_mark_repeated_one_die_away_is_design_and_a_particle_is_not():
    pitch = 400
    img = _surface((900, 1300), seed=4)
    for die in range(3):  # the same small mark in every die's street
        _disc(img, (300, 80 + die * pitch), 4, 0.8)
    _disc(img, (600, 500), 4, -0.5)  # one particle
    geometry = MosaicGrid((0.0, 0.0), 1.0, img.shape)
    map_px = 4.0
    surface = np.ones((225, 325), dtype=bool)
    origin = (1.5, 1.5)  # centre of map pixel (0, 0): 4 x 4 mosaic pixels
    anomaly = np.zeros(surface.shape, np.float32)
    patches, _ = plain_spot_patches(img, geometry, LEVEL, surface, origin, map_px, 1.0,
                                    die_pitch_px=(float(pitch), float(pitch)))
    from scanner.inspection.dietodie import apply_patches

    apply_patches(anomaly, patches)
    hot = np.argwhere(anomaly >= 1.0)
    assert len(hot) > 0
    # only the particle, at map pixel (150, 125) = mosaic (600, 500) / 4
    assert np.all(np.hypot(hot[:, 0] - 150, hot[:, 1] - 125) <= 3)
    # without the die grid, the marks are spots too
    patches, _ = plain_spot_patches(img, geometry, LEVEL, surface, origin, map_px, 1.0)
    anomaly[:] = 0
    apply_patches(anomaly, patches)
    assert np.count_nonzero(anomaly[70:80, 15:25] >= 1.0) > 0


def test_a_structure_cut_by_a_band_edge_is_not_a_spot_and_a_particle_still_is():
    """A band across a wafer (``scan.region``) ends inside the usable area: a design edge
    cut by the mosaic's edge, ringed by quiet surface on its three other sides, was a
    'scratch' at score 2.5 (probe P10, a 76 mm wafer band: 8 false defects, all along the
    band's two edges)."""
    img = _surface((600, 700), seed=6)
    img[:90, 300:302] *= 1.4  # a bright design line running into the band's top edge
    img[590:, 500:502] *= 0.6  # a dark one 10 px from its bottom edge, and on to it
    _disc(img, (300, 200), 4, -0.5)  # a particle in the middle of the band
    geometry = MosaicGrid((0.0, 0.0), 1.0, img.shape)
    surface = np.ones((150, 175), dtype=bool)  # plain up to the mosaic's edges
    origin = (1.5, 1.5)

    def hot(surface):
        from scanner.inspection.dietodie import apply_patches

        anomaly = np.zeros(surface.shape, np.float32)
        patches, _ = plain_spot_patches(img, geometry, LEVEL, surface, origin, 4.0, 1.0)
        apply_patches(anomaly, patches)
        return np.argwhere(anomaly >= 1.0)

    found = hot(surface)
    assert len(found) > 0
    # only the particle, at map pixel (75, 50) = mosaic (300, 200) / 4
    assert np.all(np.hypot(found[:, 0] - 75, found[:, 1] - 50) <= 3), found


def test_surface_level_median_is_scipys():
    """The surface level's median of block means (a partition of each window's values, for
    speed) is scipy's median filter exactly, edges (nearest) included."""
    from scanner.inspection.plainspots import _median_filter

    rng = np.random.default_rng(3)
    for shape in [(40, 52), (7, 7), (3, 30)]:
        a = rng.normal(LEVEL, 20.0, shape).astype(np.float32)
        a[0, :3] = LEVEL  # ties
        for size in (3, 7):
            expected = ndimage.median_filter(a, size=size, mode="nearest")
            assert np.array_equal(_median_filter(a, size), expected)
