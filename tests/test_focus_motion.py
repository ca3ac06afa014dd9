"""Focus-related motion: concurrent focus and XY moves, the focus points' stage tour."""

from __future__ import annotations

import numpy as np
import pytest

from scanner.acquisition.focus.surface import focus_points_layout, tour_order
from simulators.clock import HardwareClock
from simulators.stage import StageAxes, axis_move_time_s


def _axes(clock: HardwareClock) -> tuple[StageAxes, StageAxes]:
    rng = np.random.default_rng(0)
    xy = StageAxes([(-1e5, 1e5)] * 2, 20_000, 200_000, 0.03, 0.0, clock, rng)
    z = StageAxes([(-500, 500)], 1000, 50_000, 0.01, 0.0, clock, rng)
    return xy, z


def test_focus_move_runs_during_the_xy_move():
    clock = HardwareClock()
    xy, z = _axes(clock)
    xy.start_move_to(2000.0, 0.0)
    z.start_move_to(3.0)
    assert clock.elapsed_s == 0.0  # nothing charged until someone waits
    xy.wait()
    z.wait()
    t_xy = axis_move_time_s(2000.0, 20_000, 200_000) + 0.03
    assert clock.elapsed_s == pytest.approx(t_xy)  # the shorter Z move is hidden
    assert float(z.true[0]) == pytest.approx(3.0)


def test_sequential_moves_cost_the_sum():
    clock = HardwareClock()
    xy, z = _axes(clock)
    xy.move_to(2000.0, 0.0)
    z.move_to(3.0)
    expected = (axis_move_time_s(2000.0, 20_000, 200_000) + 0.03
                + axis_move_time_s(3.0, 1000, 50_000) + 0.01)
    assert clock.elapsed_s == pytest.approx(expected)
    # a move started on a busy axis begins when the axis is free
    xy.start_move_to(4000.0, 0.0)
    xy.start_move_to(6000.0, 0.0)
    xy.wait()
    assert clock.elapsed_s == pytest.approx(expected + 2 * (
        axis_move_time_s(2000.0, 20_000, 200_000) + 0.03))


def test_tour_visits_every_point_once_and_shortens_the_path():
    angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    circle = np.stack([25_000 * np.cos(angles), 25_000 * np.sin(angles)], axis=1)
    pts = focus_points_layout(circle, 25, "rings", margin_um=500)
    start, end = (0.0, 0.0), (-9000.0, 22000.0)
    order = tour_order(pts, start, end)
    assert sorted(order.tolist()) == list(range(len(pts)))

    def length(p: np.ndarray) -> float:
        nodes = np.vstack([start, p, end])
        return float(np.sum(np.max(np.abs(np.diff(nodes, axis=0)), axis=1)))

    assert length(pts[order]) < length(pts)  # shorter than ring by ring
    shuffled = pts[np.random.default_rng(1).permutation(len(pts))]
    assert length(shuffled[tour_order(shuffled, start, end)]) < 0.5 * length(shuffled)
    assert tour_order(pts[:1], start, end).tolist() == [0]
