"""scan.region: a band across the sample (how a 300 mm wafer is measured on a small disk)."""

from __future__ import annotations

import pytest

from scanner.acquisition.plan import plan_scan
from scanner.errors import PlanError, RecipeError
from scanner.recipe import parse_recipe


def _recipe(tmp_path, region=None):
    data = {"sample": {"kind": "wafer", "diameter_mm": 300, "edge_exclusion_mm": 3,
                       "center_um": [1000, -2000]},
            "microscope": {"kind": "simulated"}, "scan": {"align": False}}
    if region is not None:
        data["scan"]["region"] = region
    return parse_recipe(data, base_dir=tmp_path)


def test_a_band_across_the_diameter(tmp_path):
    fov = (4096.0, 4096.0)
    plan = plan_scan(_recipe(tmp_path, {"band_mm": [-2, 2]}), fov)
    ys = [t.y_um for t in plan.tiles]
    xs = [t.x_um for t in plan.tiles]
    assert plan.n_rows <= 2
    assert max(xs) - min(xs) > 280_000  # across the whole diameter
    assert all(abs(y + 2000) < 2000 + fov[1] for y in ys)  # around the wafer's middle
    off = plan_scan(_recipe(tmp_path, {"band_mm": [100, 104]}), fov)
    assert len(off.tiles) < len(plan.tiles)  # the circle is narrower 100 mm off its centre
    assert all(t.y_um > -2000 + 100_000 - fov[1] for t in off.tiles)


def test_bad_bands_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="band_mm"):
        _recipe(tmp_path, {"band_mm": [3, 1]})
    with pytest.raises(RecipeError):
        _recipe(tmp_path, {"band_mm": [1]})
    with pytest.raises(PlanError, match="misses"):
        plan_scan(_recipe(tmp_path, {"band_mm": [200, 210]}), (4096.0, 4096.0))


def test_a_band_scan_reports_only_the_dies_it_imaged(tmp_path):
    import numpy as np

    from scanner.reports.locate import ScanContext, tested_dies

    sample = {"kind": "wafer", "diameter_mm": 100, "edge_exclusion_mm": 3,
              "die_pitch_mm": [10, 10], "orientation": "notch"}
    scan = {"recipe": {"sample": sample}}
    fov = (4000.0, 4000.0)
    xs = np.arange(-50_000, 50_001, 3_600.0)
    band = np.column_stack([np.arange(len(xs)), xs, np.zeros_like(xs)])  # y from -2 to 2 mm
    whole = np.array([(k, x, y) for k, (x, y) in enumerate(
        (x, y) for x in xs for y in np.arange(-50_000, 50_001, 3_600.0))], dtype=float)
    all_dies = tested_dies(ScanContext(tmp_path, scan, sample, fov, whole), [])
    band_dies = tested_dies(ScanContext(tmp_path, scan, sample, fov, band), [])
    assert len(all_dies) > 60  # the whole wafer's dies, as before
    ctx = ScanContext(tmp_path, scan, sample, fov, whole)
    assert ctx.inspected_polygon().equals(ctx.usable_polygon())
    # the band (y in [-2, 2] mm) crosses the two rows of dies either side of y = 0 only
    assert {d["row"] for d in band_dies} == {-1, 0}
    assert 0 < len(band_dies) < len(all_dies) / 3
    assert not any(d["full"] for d in band_dies)  # every die was only partly imaged
