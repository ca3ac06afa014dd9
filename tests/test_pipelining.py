"""Processing while the stage moves: pairs registered during acquisition (``registration.live``)
give the stitch stage the very result it computes alone, bit for bit, whatever fails."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import SMALL_WAFER as SMALL

import scanner.pipeline as pipeline
from scanner.pipeline import restitch, resume_scan, run_scan
from scanner.recipe import parse_recipe
from scanner.stitching.registration import live
from scanner.stitching.registration.flatfield import estimate_flatfield, thumbnail
from scanner.stitching.registration.live import LiveRegistrar, LiveResults
from scanner.stitching.registration.scan import CameraGeometry, register_tiles
from scanner.tilestore import open_tiles, read_tiles_csv

#: the tests that run a small scan (a few seconds each)
slow = pytest.mark.slow


def _recipe(root: Path, **scan: object):
    data = json.loads(json.dumps(SMALL))
    data["scan"].update(scan)
    return parse_recipe(data, root, "small")


def _run(recipe, out: Path, mp: pytest.MonkeyPatch) -> tuple[Path, LiveResults | None]:
    """Run a scan; the pairs handed from acquisition to the stitch stage."""
    seen: list[LiveResults | None] = []
    stitch_stage = pipeline._stitch_stage

    def capture(*args, precomputed=None, **kwargs):
        seen.append(precomputed)
        return stitch_stage(*args, precomputed=precomputed, **kwargs)

    mp.setattr(pipeline, "_stitch_stage", capture)
    result = run_scan(recipe, out)
    return result.folder, seen[-1]


def _outputs(folder: Path) -> dict[str, object]:
    """What stitching leaves: registered positions (as tiles.csv holds them), the flat-field
    and every mosaic level."""
    text = (folder / "tiles.csv").read_text()
    levels = sorted(p.name for p in (folder / "mosaic.ome.zarr").iterdir() if p.is_dir())
    out: dict[str, object] = {"tiles.csv": text}
    for name in levels:
        out[f"mosaic/{name}"] = zarr.open_array(folder / "mosaic.ome.zarr" / name)[:]
    ff = folder / "flatfield.npy"
    out["flatfield"] = np.load(ff) if ff.is_file() else None
    return out


def _assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def _sequential(folder: Path, tmp: Path) -> dict[str, object]:
    """The same folder stitched again without anything from acquisition."""
    copy = tmp / "restitched" / folder.name
    shutil.copytree(folder, copy)
    restitch(copy)
    assert json.loads((copy / "scan.json").read_text())["registration"][
        "n_pairs_precomputed"] == 0
    return _outputs(copy)


def _register(folder: Path, precomputed=None, **kwargs):
    scan = json.loads((folder / "scan.json").read_text())
    records = [r for r in read_tiles_csv(folder) if r.status == "ok"]
    camera = CameraGeometry(float(scan["microscope"]["pixel_size_um"]))
    rep = float(scan["recipe"]["microscope"]["stage"]["repeatability_um"])
    return register_tiles(open_tiles(folder), records, camera, rep, precomputed=precomputed,
                          **kwargs)


def _pair_fields(pairs) -> np.ndarray:
    return np.array([(q.a, q.b, q.dx, q.dy, q.ncc, q.peak_ratio, q.texture, q.ok, *q.info)
                     for q in pairs], dtype=float)


@pytest.fixture(scope="module")
def live_scan(tmp_path_factory) -> tuple[Path, LiveResults]:
    root = tmp_path_factory.mktemp("live")
    with pytest.MonkeyPatch.context() as mp:
        folder, results = _run(_recipe(root), root / "scan", mp)
    assert results is not None
    return folder, results


@slow
def test_registration_during_acquisition_equals_the_sequential_stitch(live_scan, tmp_path):
    folder, results = live_scan
    scan = json.loads((folder / "scan.json").read_text())
    reg = scan["registration"]
    # every pair was measured while the stage moved (a serpentine scan: the new tile is the
    # left one of half the row pairs) and none after
    assert reg["n_pairs"] > 10 and reg["n_pairs_precomputed"] == reg["n_pairs"]
    assert scan["during_acquisition"]["pairs"] == reg["n_pairs"]
    assert scan["during_acquisition"]["failures"] == 0
    assert scan["timings"]["during_acquisition"]["busy_s"] > 0
    # and every tile's flat-field thumbnail (none read back from the store)
    assert scan["flatfield"]["path"] == "flatfield.npy"
    assert scan["flatfield"]["thumbnails_precomputed"] == scan["flatfield"]["tiles_used"] > 8
    # tiles.csv's registered positions and the mosaic are those of a stitch without them
    _assert_same(_outputs(folder), _sequential(folder, tmp_path))
    # and so are the pairs and the positions at full precision
    c_live, s_live, p_live, _ = _register(folder, results)
    c_seq, s_seq, p_seq, _ = _register(folder)
    assert s_live.n_pairs_precomputed == len(p_live) and s_seq.n_pairs_precomputed == 0
    np.testing.assert_array_equal(_pair_fields(p_live), _pair_fields(p_seq))
    assert np.array_equal(c_live, c_seq)


def _bogus(m: live.MeasuredPair, **changes) -> live.MeasuredPair:
    """A measured pair with a wrong offset: used, it moves the tiles."""
    return replace(m, result=replace(m.result, dx=m.result.dx + 40.0), **changes)


def _shift_key(m: live.MeasuredPair) -> dict:
    oy, ox, wy, wx = m.key
    return {"key": (oy, ox, wy + 1, wx)}


def _read_beyond(m: live.MeasuredPair) -> dict:
    h, w = m.shape
    return {"a_read": (0, h, 0, w)}  # the whole tile: more than the strip kept of it


@slow
@pytest.mark.parametrize("change", [
    pytest.param(_shift_key, id="another search window"),
    pytest.param(lambda m: {"min_ncc": m.min_ncc + 0.1}, id="another min_ncc"),
    pytest.param(lambda m: {"shape": (m.shape[0], m.shape[1] + 1)}, id="another shape"),
    pytest.param(lambda m: {"a": (*m.a[:-2], "1.2345", m.a[-1])}, id="tile a taken again"),
    pytest.param(lambda m: {"b": (*m.b[:-2], "1.2345", m.b[-1])}, id="tile b taken again"),
    pytest.param(_read_beyond, id="read beyond the strip kept"),
    pytest.param(lambda m: {"b_outside": True}, id="read outside tile b"),
    pytest.param(lambda m: {"a_outside": True, "a_held": (0, 1, 0, 1)},
                 id="ended at another strip's edge"),
])
def test_pairs_measured_otherwise_are_not_reused(live_scan, change):
    folder, results = live_scan
    c_seq, _, p_seq, _ = _register(folder)
    # the control: a pair that passes the checks is taken as it is (a wrong one moves tiles)
    poisoned = LiveResults({k: _bogus(m) for k, m in results.pairs.items()})
    c_bad, s_bad, _, _ = _register(folder, poisoned)
    assert s_bad.n_pairs_precomputed == len(p_seq) and not np.allclose(c_bad, c_seq)
    other = LiveResults({k: _bogus(m, **change(m)) for k, m in results.pairs.items()})
    c, s, pairs, _ = _register(folder, other)
    assert s.n_pairs_precomputed == 0
    np.testing.assert_array_equal(_pair_fields(pairs), _pair_fields(p_seq))
    assert np.array_equal(c, c_seq)


def _replay(folder: Path, **kwargs) -> LiveResults:
    """A registrar fed the scan's tiles in acquisition order, from the store."""
    scan = json.loads((folder / "scan.json").read_text())
    tiles = open_tiles(folder)
    records = sorted((r for r in read_tiles_csv(folder) if r.status == "ok"),
                     key=lambda r: r.time_s)
    camera = CameraGeometry(float(scan["microscope"]["pixel_size_um"]))
    rep = float(scan["recipe"]["microscope"]["stage"]["repeatability_um"])
    registrar = LiveRegistrar(
        tiles.shape[1:], camera, rep,
        planned=[(r.index, r.row, r.col, r.x_planned_um, r.y_planned_um) for r in records],
        coming=[r.index for r in records], **kwargs)
    for r in records:
        registrar.feed(np.asarray(tiles[r.index]), r)
    return registrar.finish()


@slow
def test_a_registrar_with_other_parameters_hands_nothing_over(live_scan):
    folder, _ = live_scan
    c_seq, s_seq, p_seq, _ = _register(folder)
    same = _replay(folder)
    assert _register(folder, same)[1].n_pairs_precomputed == len(p_seq)
    for kwargs in ({"max_shift_um": 20.0}, {"min_ncc": 0.5}):
        measured = _replay(folder, **kwargs)
        assert measured.stats["pairs"] == len(p_seq)
        c, s, pairs, _ = _register(folder, measured)
        assert s.n_pairs_precomputed == 0, kwargs
        np.testing.assert_array_equal(_pair_fields(pairs), _pair_fields(p_seq))
        assert np.array_equal(c, c_seq)
    # what the stitch is asked for is what counts: the same window there takes them all
    c, s, _, _ = _register(folder, _replay(folder, max_shift_um=20.0), max_shift_um=20.0)
    assert s.n_pairs_precomputed == len(p_seq)
    assert np.array_equal(c, _register(folder, max_shift_um=20.0)[0])


@slow
def test_failures_in_the_background_leave_a_complete_identical_scan(tmp_path, monkeypatch):
    register_one = live._register_one
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("a pair failed in the background")
        return register_one(*args, **kwargs)

    process = LiveRegistrar._process

    def failing_tile(self, image, record):
        if record.index == 5:
            raise MemoryError("a tile failed in the background")
        return process(self, image, record)

    feed = LiveRegistrar.feed

    def failing_feed(self, image, record):
        if record.index == 9:
            raise RuntimeError("queueing failed")
        return feed(self, image, record)

    monkeypatch.setattr(live, "_register_one", flaky)
    monkeypatch.setattr(LiveRegistrar, "_process", failing_tile)
    monkeypatch.setattr(LiveRegistrar, "feed", failing_feed)
    folder, _ = _run(_recipe(tmp_path), tmp_path / "scan", monkeypatch)
    scan = json.loads((folder / "scan.json").read_text())
    assert scan["status"] == "complete" and scan["acquired_tiles"] == scan["plan"]["n_tiles"]
    assert scan["during_acquisition"]["failures"] >= 2
    reg = scan["registration"]
    assert 0 < reg["n_pairs_precomputed"] < reg["n_pairs"]
    # tile 5 failed before its thumbnail, tile 9 was never queued: read from the store
    ff = scan["flatfield"]
    assert ff["thumbnails_precomputed"] == ff["tiles_used"] - 2
    monkeypatch.undo()
    _assert_same(_outputs(folder), _sequential(folder, tmp_path))


@slow
def test_a_worker_too_slow_drops_tiles_not_the_scan(tmp_path, monkeypatch):
    # one tile fits in the queue: what arrives while the worker is busy is dropped
    init = LiveRegistrar.__init__

    def tiny_queue(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "max_queued_bytes": 1})

    monkeypatch.setattr(LiveRegistrar, "__init__", tiny_queue)
    register_one = live._register_one

    def slow(*args, **kwargs):
        import time

        time.sleep(0.2)
        return register_one(*args, **kwargs)

    monkeypatch.setattr(live, "_register_one", slow)
    folder, _ = _run(_recipe(tmp_path), tmp_path / "scan", monkeypatch)
    scan = json.loads((folder / "scan.json").read_text())
    assert scan["status"] == "complete" and scan["during_acquisition"]["dropped"] > 0
    assert scan["registration"]["n_pairs_precomputed"] < scan["registration"]["n_pairs"]
    monkeypatch.undo()
    _assert_same(_outputs(folder), _sequential(folder, tmp_path))


@slow
def test_resume_measures_the_pairs_with_earlier_tiles_after(tmp_path, monkeypatch):
    data = json.loads(json.dumps(SMALL))
    data["microscope"]["faults"] = {"camera_timeout_rate": 0.3, "seed": 2}
    data["scan"].update(retries=0, align=False)
    folder, _ = _run(parse_recipe(data, tmp_path, "lossy"), tmp_path / "scan", monkeypatch)
    first = json.loads((folder / "scan.json").read_text())
    assert first["status"] == "incomplete"
    # with tiles lost, the tiles' rows in tiles.csv are not their plan indices
    assert 0 < first["registration"]["n_pairs_precomputed"] == first["registration"]["n_pairs"]
    _assert_same(_outputs(folder), _sequential(folder, tmp_path / "first"))
    resume_scan(folder)
    scan = json.loads((folder / "scan.json").read_text())
    reg = scan["registration"]
    # the pairs of two tiles taken by the resume were measured during it, those with a tile
    # of the first run after it
    assert 0 < scan["during_acquisition"]["tiles"] == (scan["acquired_tiles"]
                                                       - first["acquired_tiles"])
    assert reg["n_pairs_precomputed"] == scan["during_acquisition"]["pairs"]
    assert reg["n_pairs_precomputed"] < reg["n_pairs"]
    _assert_same(_outputs(folder), _sequential(folder, tmp_path))


def test_tracked_strip_records_what_was_read_and_reads_outside():
    strip = live._Tracked(np.arange(40.0).reshape(4, 10), 6, 0)  # rows 6..9 of a tile
    assert strip.region == (6, 10, 0, 10)
    assert strip[slice(7, 9), slice(2, 5)].shape == (2, 3)
    strip[slice(6, 8), slice(4, 10)]
    assert strip.read == (6, 9, 2, 10) and not strip.outside
    with pytest.raises(IndexError):
        strip[slice(5, 8), slice(0, 2)]
    assert strip.outside and strip.read == (6, 9, 2, 10)


def test_flatfield_from_precomputed_thumbnails_is_the_same():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:96, :128]
    gain = 1 - 0.2 * (((yy - 48) / 48) ** 2 + ((xx - 64) / 64) ** 2)
    tiles = (rng.uniform(0.6, 1.0, (30, 96, 128)) * gain * 3000).astype(np.uint16)
    plain = estimate_flatfield(tiles, range(30))
    assert plain is not None
    thumbs = {i: thumbnail(tiles[i]) for i in range(0, 30, 2)}

    class Counting:  # what is read from the store
        shape, read = tiles.shape, []

        def __getitem__(self, i):
            self.read.append(i)
            return tiles[i]

    store = Counting()
    assert np.array_equal(estimate_flatfield(store, range(30), thumbnails=thumbs), plain)
    assert store.read == list(range(1, 30, 2))
    # a thumbnail of another shape is not one of these tiles': it is computed again
    odd = {i: t[:-1] for i, t in thumbs.items()}
    assert np.array_equal(estimate_flatfield(tiles, range(30), thumbnails=odd), plain)
    # the control: thumbnails given are used as they are
    wrong = {i: t[::-1] for i, t in thumbs.items()}
    assert not np.array_equal(estimate_flatfield(tiles, range(30), thumbnails=wrong), plain)


@slow
def test_thumbnails_of_other_acquisitions_are_not_used(live_scan):
    folder, results = live_scan
    records = [r for r in read_tiles_csv(folder) if r.status == "ok"]
    assert results.thumbnails_for(records).keys() == {r.index for r in records}
    again = [replace(r, time_s=r.time_s + 1.0) if r.index % 2 else r for r in records]
    assert results.thumbnails_for(again).keys() == {r.index for r in records
                                                     if r.index % 2 == 0}


@slow
def test_a_scan_releases_its_microscope_when_acquisition_ends(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    """The devices are unloaded once the last tile is in (a serial controller's port is free
    for the next scan), and the core is freed with its C++ threads, not kept by the engine
    the scan gave it (each leaked core held four threads, its devices and the tile store)."""
    import gc
    import weakref

    built = []
    build = pipeline.build_microscope

    def keep(recipe):
        handle = build(recipe)
        built.append((weakref.ref(handle.core), handle))
        return handle

    monkeypatch.setattr(pipeline, "build_microscope", keep)
    stages: list[tuple[str, bool]] = []
    stitch_stage = pipeline._stitch_stage

    def stitch(*args, **kwargs):
        stages.append(("stitch", built[-1][1].closed))
        return stitch_stage(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_stitch_stage", stitch)
    result = run_scan(_recipe(tmp_path), tmp_path / "scan")
    assert result.status == "complete"
    core_ref, handle = built.pop()
    assert stages == [("stitch", True)]  # released before the mosaic is made
    assert handle.closed and handle.core.getLoadedDevices() == ("Core",)
    del handle
    gc.collect()
    assert core_ref() is None


def test_a_scan_stopped_while_a_tile_is_processed_logs_no_failure(caplog):
    # the scan stops (a full disk, Ctrl-C) while the worker is inside a tile: abort() shuts
    # the pool down under it, and its next pair could not be submitted. That was logged as an
    # ERROR with a traceback ("live registration of tile 1 failed; the stitch stage measures
    # its pairs": no stitch stage follows) under the one line that says why the scan stopped
    rng = np.random.default_rng(0)
    image = (rng.random((64, 64)) * 4000).astype(np.uint16)
    registrar = LiveRegistrar((64, 64), CameraGeometry(10.0), 2.0,
                              planned=[(0, 0, 0, 0.0, 0.0), (1, 0, 1, 576.0, 0.0)],
                              coming=[0, 1])
    slots = registrar._slots

    class StoppedMeanwhile:
        def acquire(self):
            registrar.abort()  # the scan stopped between the worker's check and its submit
            return slots.acquire()

        def release(self):
            slots.release()

    registrar._slots = StoppedMeanwhile()
    registrar.feed(image, live.TileRecord(0, 0, 0, 0.0, 0.0, 0.0, 0.1))
    registrar.feed(image, live.TileRecord(1, 0, 1, 576.0, 0.0, 0.0, 0.2))
    with caplog.at_level("DEBUG", logger="waferscope.live"):
        registrar._thread.join(10)
    assert not registrar._thread.is_alive()
    assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == []
    assert registrar.stats["failures"] == 0
