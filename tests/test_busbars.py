"""A PV cell's busbars, its design, are taken off the anomaly map; defects on them stay."""

import math
from types import SimpleNamespace

import numpy as np

from scanner.inspection.busbars import flatten_busbars


def _cell(**kw):
    return SimpleNamespace(kind="pv_cell", busbars=2, busbar_width_mm=0.3, width_mm=20.0,
                           height_mm=20.0, center_um=(0.0, 0.0), **kw)


def test_busbar_level_removed_and_defect_kept():
    p = 120.0  # map pixel (um), stride 4 at 30 um
    n = int(20000 / p)
    a = np.full((n, n), 0.6, dtype=np.float32)
    origin = (-10000.0, -10000.0)
    cols = [int(round((x - origin[0]) / p)) for x in (-5000.0, 5000.0)]
    for c in cols:
        a[:, c - 2 : c + 3] = 0.95  # the busbar scores over the threshold all along
    a[80:84, cols[0]] = 1.6  # a short defect on the first busbar
    lowered = flatten_busbars(a, origin, p, 4, _cell(), None)
    assert lowered > 0
    other = np.r_[0:80, 84:n]
    assert a[other][:, cols[0]].max() < 0.7 and a[:, cols[1]].max() < 0.7
    assert a[80:84, cols[0]].min() > 1.2  # still over any threshold near 0.9
    assert np.allclose(a[:, :cols[0] - 20], 0.6)  # the surface away from busbars untouched


def test_not_a_pv_cell_nor_a_cell_without_busbars_is_touched():
    a = np.full((50, 50), 0.9, dtype=np.float32)
    a[:, 20:23] = 1.5
    before = a.copy()
    assert flatten_busbars(a, (0.0, 0.0), 120.0, 4, SimpleNamespace(kind="wafer"), None) == 0
    no_bars = SimpleNamespace(kind="pv_cell", busbars=0, busbar_width_mm=0.3, width_mm=20.0,
                              height_mm=20.0, center_um=(0.0, 0.0))
    assert flatten_busbars(a, (0.0, 0.0), 120.0, 4, no_bars, None) == 0
    np.testing.assert_array_equal(a, before)


def test_the_busbars_of_a_cell_placed_turned_are_followed_where_the_alignment_puts_them():
    p = 120.0
    n = int(20000 / p)
    a = np.full((n, n), 0.6, dtype=np.float32)
    origin = (-10000.0, -10000.0)
    centre, turn = (300.0, -200.0), math.radians(0.8)
    ys = origin[1] + np.arange(n) * p
    for u in (-5000.0, 5000.0):  # each busbar's centre across the cell, in its own frame
        v = (ys - centre[1] - u * math.sin(turn)) / math.cos(turn)
        xs = centre[0] + u * math.cos(turn) - v * math.sin(turn)
        for r, c in enumerate(np.rint((xs - origin[0]) / p).astype(int)):
            a[r, c - 2:c + 3] = 0.95
    lowered = flatten_busbars(a, origin, p, 4, _cell(), {"center_um": list(centre),
                                                         "rotation_deg": 0.8})
    assert lowered > 0 and a.max() < 0.7  # both busbars, all along their turned course
    untouched = np.full((n, n), 0.6, dtype=np.float32)
    untouched[:, 80:85] = 0.95  # a line where no busbar lies (x -400 um) stays
    flatten_busbars(untouched, origin, p, 4, _cell(), {"center_um": list(centre),
                                                        "rotation_deg": 0.8})
    assert untouched[:, 80:85].min() == np.float32(0.95)
