"""The brightness level a mosaic is normalised by is its lit surface's, whatever large dark or
bright areas (a PV cell's dead region, its busbars, a reflection) it also shows."""

import numpy as np
import pytest

from scanner.inspection.tiled import source_level
from simulators.samples.pv_cell import PVCellSample


def _cell(grain_mm: float, busbars: int = 3, busbar_mm: float = 1.2, side_mm: float = 20.0,
          p: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """A good cell's EL image (counts) and which of its columns are busbar."""
    s = PVCellSample(side_mm, side_mm, busbars, busbar_mm, 1.8, 80, grain_size_mm=grain_mm,
                     n_defects=0, seed=90101)
    n = int(side_mm * 1000 / p)
    image = s.render(-side_mm * 500, -side_mm * 500, (n, n), p) * np.float32(3000)
    x = -side_mm * 500 + (np.arange(n) + 0.5) * p
    bar = np.zeros(n, dtype=bool)
    for bx in s._busbar_x:
        bar |= np.abs(x - bx) < busbar_mm * 500 + p
    return image, bar


@pytest.mark.parametrize("grain_mm", [0.0, 5.0])
@pytest.mark.parametrize("dark", [0.0, 0.2, 0.4])
def test_a_dead_region_does_not_move_the_level_of_the_rest_of_the_cell(grain_mm, dark):
    image, bar = _cell(grain_mm)
    k = int(dark * image.shape[1])
    image[:, :k] *= np.float32(0.35)  # a dead region over the left part of the cell
    lit = np.median(image[:, k:][:, ~bar[k:]])
    # the plain median put it at 0.40 x the lit surface with 40 % dead (0.89-0.92 at 20 %):
    # the rest of the cell read 2.5 x too bright
    assert source_level(image) == pytest.approx(lit, rel=0.03)


def test_wide_busbars_and_a_bright_area_do_not_set_the_level():
    # six 3 mm busbars over a 30 mm cell: most of it is busbar, the median was a busbar's
    image, bar = _cell(5.0, busbars=6, busbar_mm=3.0, side_mm=30.0)
    lit = np.median(image[:, ~bar])
    assert np.median(image) < 0.2 * lit
    assert source_level(image) == pytest.approx(lit, rel=0.03)
    image, bar = _cell(0.0)
    n = image.shape[1]
    k = int(0.8 * n)
    lit = np.median(image[:, :k][:, ~bar[:k]])
    # a reflection over a fifth of the cell (the lit surface is found from the brightest
    # quarter, so a bright area must be smaller than that)
    image[:, k:] *= np.float32(2.5)
    assert source_level(image) == pytest.approx(lit, rel=0.03)


def test_the_level_leaves_out_the_unscanned_and_what_lies_off_the_sample():
    image, bar = _cell(0.0)
    lit = np.median(image[:, ~bar])
    padded = np.pad(image, ((0, 200), (0, 0)))  # unscanned rows (zeros)
    assert source_level(padded) == pytest.approx(lit, rel=0.03)
    chuck = np.pad(image, ((0, 200), (0, 0)), constant_values=50.0)
    rows_inside = image.shape[0]
    assert source_level(chuck, inside=lambda r, c: np.broadcast_to(
        (r < rows_inside)[:, None], (len(r), len(c)))) == pytest.approx(lit, rel=0.03)
