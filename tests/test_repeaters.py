"""Repeater analysis: defects at one in-die position in most dies are reported apart."""

from __future__ import annotations

import numpy as np

from scanner.defectlist import Defect
from scanner.reports.repeaters import find_repeaters


def _defect(i: int, col: int, row: int, dx: float, dy: float) -> Defect:
    x, y = col * 5000.0 + dx, row * 5000.0 + dy
    return Defect(id=i, x_um=x, y_um=y, bbox_um=(x - 5, y - 5, x + 5, y + 5), area_um2=100.0,
                  size_um=10.0, defect_class="particle", score=0.9, roughness=float("nan"),
                  uncertainty=0.01, review=False, die_col=col, die_row=row, die_x_um=dx,
                  die_y_um=dy)


def test_a_position_repeated_in_most_dies_is_a_repeater_and_random_defects_stay() -> None:
    rng = np.random.default_rng(0)
    dies = [(c, r) for c in range(3) for r in range(2)]  # 6 full dies
    defects = [_defect(k, c, r, 1200 + rng.normal(0, 8), 3400 + rng.normal(0, 8))
               for k, (c, r) in enumerate(dies[:5])]  # a design feature in 5 of 6 dies
    defects += [_defect(10 + k, c, r, float(x), float(y)) for k, ((c, r), x, y) in enumerate(
        zip(dies, rng.uniform(0, 5000, 6), rng.uniform(0, 5000, 6), strict=True))]
    # the same position in only 2 dies: below half of the dies, still random
    defects += [_defect(20, 0, 0, 4000, 800), _defect(21, 2, 1, 4010, 805)]
    random, groups = find_repeaters(defects, n_full_dies=6, tolerance_um=60.0)
    assert len(groups) == 1
    g = groups[0]
    assert sorted(d.id for d in g.defects) == [0, 1, 2, 3, 4]
    assert abs(g.die_x_um - 1200) < 10 and abs(g.die_y_um - 3400) < 10
    assert sorted(d.id for d in random) == [10, 11, 12, 13, 14, 15, 20, 21]
    assert g.to_dict()["n_dies"] == 5


def test_too_few_dies_or_unlocated_defects_give_no_repeaters() -> None:
    defects = [_defect(k, k, 0, 100.0, 100.0) for k in range(3)]
    assert find_repeaters(defects, n_full_dies=2, tolerance_um=60.0)[1] == []
    plain = [Defect(id=0, x_um=0.0, y_um=0.0, bbox_um=(0, 0, 1, 1), area_um2=1.0, size_um=1.0,
                    defect_class="pit", score=0.9, roughness=0.0, uncertainty=0.0,
                    review=False)]
    random, groups = find_repeaters(plain, n_full_dies=10, tolerance_um=60.0)
    assert random == plain and groups == []
