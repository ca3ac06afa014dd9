"""Stopped scans: statuses, ``resume``, storage errors, and refusing damaged or unfinished data.

The kill tests run ``waferscope`` as a real process (``kill -9`` and SIGTERM cannot be tested
in-process) on a small wafer with ``realtime: true``, so that acquisition lasts a few seconds.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from conftest import SMALL_WAFER as SMALL
from typer.testing import CliRunner

from scanner.cli import app
from scanner.pipeline import run_scan
from scanner.recipe import parse_recipe
from scanner.scanfolder import effective_status

# every test here runs or resumes a scan (together some 20 s): not for `make test-fast`
pytestmark = pytest.mark.slow

runner = CliRunner()

WAFERSCOPE = [sys.executable, "-m", "scanner"]


def _recipe(tmp_path: Path, realtime: bool = False, **scan: object) -> Path:
    import yaml

    data = json.loads(json.dumps(SMALL))
    data["microscope"]["realtime"] = realtime
    data["scan"].update(scan)
    path = tmp_path / f"small{'_rt' if realtime else ''}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _started(folder: Path) -> float:
    """Wait until a run has created its scan.json; the time it did."""
    deadline = time.monotonic() + 120
    while not (folder / "scan.json").is_file():
        assert time.monotonic() < deadline, f"{folder} never appeared"
        time.sleep(0.02)
    return time.perf_counter()


def _scan(folder: Path) -> dict:
    return json.loads((folder / "scan.json").read_text())


def _ok_rows(folder: Path) -> collections.Counter:
    with open(folder / "tiles.csv", newline="") as f:
        return collections.Counter(int(r["index"]) for r in csv.DictReader(f)
                                   if r.get("status") == "ok")


def _defects(folder: Path) -> list[tuple]:
    data = json.loads((folder / "defects.json").read_text())
    return sorted((d["defect_class"], round(d["x_um"], 1), round(d["y_um"], 1))
                  for d in data["defects"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run (inspected and reported) of the small wafer."""
    root = tmp_path_factory.mktemp("reference")
    out = root / "scan"
    subprocess.run([*WAFERSCOPE, "run", str(_recipe(root)), "--out", str(out)], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def plain_scan(tmp_path_factory) -> Path:
    """A complete, uninspected scan of the small wafer (copied by tests that damage it)."""
    root = tmp_path_factory.mktemp("plain")
    result = run_scan(parse_recipe(SMALL, root, "small"), root / "scan")
    assert result.status == "complete"
    return result.folder


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume(reference: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, realtime=True)
    n = _scan(reference)["plan"]["n_tiles"]
    # the realtime run's length from its folder's creation, to place the kills in
    # acquisition, stitching and inspection
    timed = subprocess.Popen([*WAFERSCOPE, "run", str(recipe), "--out", str(tmp_path / "t")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = _started(tmp_path / "t")
    assert timed.wait() == 0
    wall = time.perf_counter() - t0
    moments = sorted(random.Random(7).uniform(0.1, 0.95) * wall for _ in range(4))
    for k, moment in enumerate(moments):
        out = tmp_path / f"killed{k}"
        proc = subprocess.Popen([*WAFERSCOPE, "run", str(recipe), "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _started(out)
        time.sleep(moment)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        scan = _scan(out)
        if scan["status"] == "complete":
            continue  # the kill came after the end
        assert effective_status(scan) == "interrupted", scan["status"]
        resumed = subprocess.run([*WAFERSCOPE, "resume", str(out)], capture_output=True,
                                 text=True)
        assert resumed.returncode == 0, resumed.stderr
        scan = _scan(out)
        assert scan["status"] == "complete"
        assert scan["acquired_tiles"] == n
        rows = _ok_rows(out)
        assert sorted(rows) == list(range(n)) and set(rows.values()) == {1}
        assert _defects(out) == _defects(reference), f"kill at {moment:.1f} s"
        ref_mosaic = zarr.open_array(reference / "mosaic.ome.zarr" / "0")[:]
        np.testing.assert_array_equal(zarr.open_array(out / "mosaic.ome.zarr" / "0")[:],
                                      ref_mosaic)


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_and_resume_finishes(tmp_path: Path) -> None:
    out = tmp_path / "scan"
    proc = subprocess.Popen([*WAFERSCOPE, "run", str(_recipe(tmp_path, realtime=True)),
                             "--no-inspect", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "tiles.csv").is_file() or len(_ok_rows(out)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "resume" in stderr and "Traceback" not in stderr
    scan = _scan(out)
    assert scan["status"] == "interrupted"  # written by the process itself
    assert 2 <= scan["acquired_tiles"] < scan["plan"]["n_tiles"]
    # an unfinished scan is refused by the stages that read it
    result = runner.invoke(app, ["stitch", str(out)])
    assert result.exit_code == 2 and "interrupted" in result.stderr
    assert "resume" in result.stderr
    resumed = subprocess.run([*WAFERSCOPE, "resume", str(out)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _scan(out)["status"] == "complete"
    assert set(_ok_rows(out).values()) == {1}
    assert (out / "mosaic.ome.zarr").is_dir()
    # nothing left to do
    again = runner.invoke(app, ["resume", str(out)])
    assert again.exit_code == 2 and "complete" in again.stderr


@pytest.mark.skipif(not hasattr(os, "setpgid"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_full_disk_stops_the_scan_with_one_line_and_resume_finishes(tmp_path: Path) -> None:
    import resource

    out = tmp_path / "scan"

    def small_files() -> None:  # files over 64 kB fail with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    quiet = {**os.environ, "PYTEST_RUNNING": "1"}  # pymmcore-plus writes no log file then
    # no alignment: its picture would be the first file to fail; the tiles are the point here
    proc = subprocess.run([*WAFERSCOPE, "run", str(_recipe(tmp_path, align=False)),
                           "--no-inspect", "--out", str(out)], capture_output=True, text=True,
                          preexec_fn=small_files, env=quiet)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "cannot write tile 0" in lines[0] and "resume" in lines[0]
    scan = _scan(out)
    assert scan["status"] == "failed" and scan["acquired_tiles"] == 0
    assert _ok_rows(out) == collections.Counter()  # nothing journaled that is not stored
    resumed = subprocess.run([*WAFERSCOPE, "resume", str(out)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _scan(out)["acquired_tiles"] == _scan(out)["plan"]["n_tiles"]


def test_deleted_tile_chunk_is_refused_not_fused_as_black(plain_scan: Path,
                                                          tmp_path: Path) -> None:
    folder = tmp_path / "scan"
    shutil.copytree(plain_scan, folder)
    shutil.rmtree(folder / "tiles.zarr" / "c" / "5")
    for command in ("stitch", "inspect"):
        result = runner.invoke(app, [command, str(folder)])
        assert result.exit_code == 2, result.output
        assert "tile 5" in result.stderr and "missing" in result.stderr
        assert f"waferscope resume {folder}" in result.stderr  # what takes it again
        assert len(result.stderr.strip().splitlines()) == 1
    # and resume does
    assert runner.invoke(app, ["resume", str(folder)]).exit_code == 0
    assert runner.invoke(app, ["stitch", str(folder)]).exit_code == 0


def test_truncated_journal_is_refused_and_left_as_it_is(plain_scan: Path,
                                                        tmp_path: Path) -> None:
    folder = tmp_path / "scan"
    shutil.copytree(plain_scan, folder)
    lines = (folder / "tiles.csv").read_text().splitlines(keepends=True)
    (folder / "tiles.csv").write_text("".join(lines[:3]))
    result = runner.invoke(app, ["stitch", str(folder)])
    assert result.exit_code == 2
    assert "2 of" in result.stderr and "planned tiles" in result.stderr
    assert len((folder / "tiles.csv").read_text().splitlines()) == 3
    # accepted as incomplete when asked, and then fused from the two tiles only
    assert runner.invoke(app, ["stitch", str(folder), "--allow-incomplete"]).exit_code == 0
    # train learns from whole good scans only, and offers no option it does not have (it
    # said "or pass --allow-incomplete", then "No such option")
    result = runner.invoke(app, ["train", "--good", str(folder), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2, result.output
    assert "planned tiles" in result.stderr and "resume" in result.stderr
    assert "--allow-incomplete" not in result.stderr


def test_deleted_mosaic_chunk_is_refused_before_inspection(plain_scan: Path,
                                                           tmp_path: Path) -> None:
    folder = tmp_path / "scan"
    shutil.copytree(plain_scan, folder)
    row = folder / "mosaic.ome.zarr" / "0" / "c" / "1"
    assert row.is_dir()
    shutil.rmtree(row)
    result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 2, result.output
    assert "missing" in result.stderr and "level 0" in result.stderr
    assert not (folder / "defects.json").exists()


def test_damaged_mosaic_chunk_or_level_is_one_line_and_exit_2(plain_scan: Path,
                                                               tmp_path: Path) -> None:
    # a chunk that cannot be decoded (truncated), a level gone, unreadable array metadata:
    # the stored data is damaged, bad input to act on (re-stitch), not a crash (exit 1)
    damage = {
        "truncated": lambda f: (f / "mosaic.ome.zarr/0/c/0/0").write_bytes(
            (f / "mosaic.ome.zarr/0/c/0/0").read_bytes()[:100]),
        "level": lambda f: shutil.rmtree(f / "mosaic.ome.zarr/1"),
        "metadata": lambda f: (f / "mosaic.ome.zarr/0/zarr.json").write_text("{"),
    }
    for name, spoil in damage.items():
        folder = tmp_path / name
        shutil.copytree(plain_scan, folder)
        spoil(folder)
        for args in (["inspect", str(folder)], ["train", "--good", str(folder), "--out",
                                                 str(tmp_path / f"m_{name}")]):
            result = runner.invoke(app, args)
            assert result.exit_code == 2, (name, args[0], result.output)
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert "damaged" in result.stderr
            # the folder is named (a chunk that cannot be decoded said "re-run ... SCAN")
            assert str(folder) in result.stderr.replace("\n", ""), result.stderr
        assert not (folder / "defects.json").exists()


def test_a_good_scan_missing_a_mosaic_chunk_is_not_learnt_from(plain_scan: Path,
                                                               tmp_path: Path) -> None:
    folder = tmp_path / "scan"
    shutil.copytree(plain_scan, folder)
    shutil.rmtree(folder / "mosaic.ome.zarr" / "0" / "c" / "1")
    result = runner.invoke(app, ["train", "--good", str(folder), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2, result.output
    assert "missing" in result.stderr and "level 0" in result.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_a_complete_scan_that_lost_a_tile_is_resumed(plain_scan: Path, tmp_path: Path) -> None:
    folder = tmp_path / "scan"
    shutil.copytree(plain_scan, folder)
    shutil.rmtree(folder / "tiles.zarr" / "c" / "5")
    assert runner.invoke(app, ["stitch", str(folder)]).exit_code == 2
    result = runner.invoke(app, ["resume", str(folder)])
    assert result.exit_code == 0, result.output
    assert (folder / "tiles.zarr" / "c" / "5").is_dir()
    assert runner.invoke(app, ["stitch", str(folder)]).exit_code == 0
    # whole again: nothing left to resume
    again = runner.invoke(app, ["resume", str(folder)])
    assert again.exit_code == 2 and "nothing to resume" in again.stderr


def test_a_tile_chunk_cut_short_is_taken_again_by_resume(plain_scan: Path,
                                                         tmp_path: Path) -> None:
    # a crash while a chunk was written leaves it there but short: stitch refused it (damage,
    # not black) and resume said "complete; nothing to resume", leaving no way forward
    folder = tmp_path / "scan"
    shutil.copytree(plain_scan, folder)
    chunk = folder / "tiles.zarr" / "c" / "3" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    refused = runner.invoke(app, ["stitch", str(folder)])
    assert refused.exit_code == 2 and "resume" in refused.stderr
    # the tile is named (zarr's error names only the codec)
    assert "tiles.zarr: tile 3 is damaged" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    result = runner.invoke(app, ["resume", str(folder)])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["stitch", str(folder)]).exit_code == 0


def test_a_journal_row_cut_short_in_its_status_is_taken_again_by_resume(
        plain_scan: Path, tmp_path: Path) -> None:
    # the last row cut short (a full disk's short write, a crash) inside its status column:
    # "...,o" has every column, and was refused as "status: 'o' is neither 'ok' nor 'lost:
    # REASON'; the journal is damaged", so the scan could not be resumed
    folder = tmp_path / "scan"
    shutil.copytree(plain_scan, folder)
    journal = folder / "tiles.csv"
    text = journal.read_bytes()
    assert text.endswith(b",ok\r\n")
    journal.write_bytes(text[:-len(b"k\r\n")])
    n = _scan(folder)["plan"]["n_tiles"]
    from scanner.tilestore import read_tiles_csv

    assert len(read_tiles_csv(folder)) == n - 1  # the cut row is no row
    refused = runner.invoke(app, ["stitch", str(folder)])
    assert refused.exit_code == 2 and f"{n - 1} of {n} planned tiles" in refused.stderr
    result = runner.invoke(app, ["resume", str(folder)])
    assert result.exit_code == 0, result.output
    rows = _ok_rows(folder)
    assert sorted(rows) == list(range(n)) and set(rows.values()) == {1}
    # a row before others that does not parse is still damage
    lines = journal.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace(",ok", ",o")
    journal.write_text("".join(lines))
    refused = runner.invoke(app, ["stitch", str(folder)])
    assert refused.exit_code == 2 and "damaged" in refused.stderr


def test_status_left_running_by_a_dead_process_reads_interrupted(plain_scan: Path,
                                                                 tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    scan = {**_scan(plain_scan), "status": "stitching",
            "process": {"pid": dead.pid, "host": _scan(plain_scan)["process"]["host"]}}
    assert effective_status(scan) == "interrupted"
    scan["process"]["pid"] = os.getpid()
    assert effective_status(scan) == "stitching"
    assert effective_status({**scan, "status": "complete"}) == "complete"


def test_a_stitch_killed_outright_gives_the_status_it_replaced_back(plain_scan: Path,
                                                                      tmp_path: Path) -> None:
    # stitch of an inspected, complete scan killed with kill -9: the mosaic is replaced whole
    # or not at all (as with Ctrl-C, which gives the status back), yet the scan read
    # "interrupted" for ever, a second stitch included, until it was resumed or inspected
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "scan"
    shutil.copytree(plain_scan, folder)
    scan = _scan(folder)
    process = {"pid": dead.pid, "host": scan["process"]["host"]}
    scan.update(status="stitching", process=process,
                options={**scan.get("options", {}), "inspect": True},
                claimed={"command": "stitch", "status": "complete", "process": process})
    (folder / "scan.json").write_text(json.dumps(scan))
    (folder / "anomaly.tmp.zarr").mkdir()  # what the killed command was writing
    assert runner.invoke(app, ["stitch", str(folder)]).exit_code == 0
    after = _scan(folder)
    assert after["status"] == "complete" and "claimed" not in after
    assert not list(folder.glob("*.tmp.zarr"))  # cleared by the next command to hold it
    # a run's own stage left by a dead process claims nothing: it stays for resume
    scan.update(claimed={"command": "inspect", "status": "complete", "process": process})
    (folder / "scan.json").write_text(json.dumps(scan))
    assert runner.invoke(app, ["stitch", str(folder)]).exit_code == 0
    assert _scan(folder)["status"] == "interrupted"


def test_lost_tiles_leave_an_incomplete_scan_that_resume_completes(tmp_path: Path) -> None:
    data = json.loads(json.dumps(SMALL))
    data["microscope"]["faults"] = {"camera_timeout_rate": 0.3, "seed": 2}
    # no retries at all: an alignment snap that times out would refuse the scan
    data["scan"].update(retries=0, align=False)
    result = run_scan(parse_recipe(data, tmp_path, "lossy"), tmp_path / "scan")
    assert result.status == "incomplete" and 0 < result.n_acquired < result.n_tiles
    scan = _scan(result.folder)
    assert len(scan["lost_tiles"]) == result.n_tiles - result.n_acquired
    from scanner.pipeline import resume_scan

    missing = result.n_tiles - result.n_acquired
    for _ in range(12):  # each resume takes the lost tiles again (and may lose some again)
        result = resume_scan(result.folder)
        now = result.n_tiles - result.n_acquired
        assert now <= missing
        missing = now
        if result.status == "complete":
            break
    assert result.status == "complete"
    assert set(_ok_rows(result.folder).values()) == {1}
    assert "lost_tiles" not in _scan(result.folder)


def test_any_write_on_a_full_disk_is_one_line_and_exit_2(tmp_path: Path) -> None:
    import resource

    def tiny_files() -> None:  # every file over 4 kB fails, whatever writes it first
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 1024, 4 * 1024))

    proc = subprocess.run([*WAFERSCOPE, "run", str(_recipe(tmp_path)), "--no-inspect",
                           "--out", str(tmp_path / "scan")], capture_output=True, text=True,
                          preexec_fn=tiny_files, env={**os.environ, "PYTEST_RUNNING": "1"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "cannot write" in lines[0] and "Traceback" not in proc.stderr
    # the file, or else the destination, is named (a library's write may name no file)
    assert str(tmp_path / "scan") in lines[0], lines[0]


def test_a_tile_taken_where_the_stage_was_not_planned_is_lost_then_resumed(
        tmp_path: Path, monkeypatch) -> None:
    """Another program moved the stage (a second process on the serial port): the tile's
    read-back lies millimetres off its plan, so it is not kept at the wrong place."""
    from scanner.acquisition import acquire
    from scanner.pipeline import resume_scan

    data = json.loads(json.dumps(SMALL))
    data["scan"].update(align=False)
    real = acquire.ScanEngine._where
    moved = []

    def elsewhere(self, event):
        where = real(self, event)
        if self.tile_index(event) == 2:
            where["x_um"] += 6700.0  # where the other program left it
            moved.append(2)
        return where

    monkeypatch.setattr(acquire.ScanEngine, "_where", elsewhere)
    result = run_scan(parse_recipe(data, tmp_path, "moved"), tmp_path / "scan")
    assert moved and result.status == "incomplete"
    lost = _scan(result.folder)["lost_tiles"]
    assert list(lost) == ["2"] and "6700 µm from the planned" in str(lost["2"])
    monkeypatch.setattr(acquire.ScanEngine, "_where", real)
    assert resume_scan(result.folder).status == "complete"


def test_hardware_that_stops_answering_stops_the_scan_and_resume_finishes(
        tmp_path: Path, monkeypatch) -> None:
    """A controller unplugged mid-scan: each further tile spent its retries and timeouts to be
    lost the same way. Five lost in a row stop the acquisition, keep what was taken, and
    `resume` finishes once the hardware answers again."""
    from devices.errors import HardwareTimeout
    from scanner.acquisition import acquire
    from scanner.pipeline import resume_scan

    data = json.loads(json.dumps(SMALL))
    data["scan"].update(align=False, retries=1)
    real = acquire.ScanEngine.exec_single_event
    taken = []

    def unplugged(self, event):
        if len(taken) >= 3:  # after three tiles, nothing answers any more
            self.mmcore.snapImage = lambda: (_ for _ in ()).throw(
                HardwareTimeout("camera: no answer"))
        for frame in real(self, event):
            taken.append(frame)
            yield frame

    monkeypatch.setattr(acquire.ScanEngine, "exec_single_event", unplugged)
    with pytest.raises(Exception, match="5 tiles in a row lost"):
        run_scan(parse_recipe(data, tmp_path, "unplugged"), tmp_path / "scan")
    folder = tmp_path / "scan"
    scan = _scan(folder)
    assert scan["status"] == "failed" and scan["acquired_tiles"] == 3
    assert "5 tiles in a row lost" in scan["error"]
    monkeypatch.setattr(acquire.ScanEngine, "exec_single_event", real)
    assert resume_scan(folder).status == "complete"


def test_a_small_scan_that_loses_every_tile_says_so_and_resume_finishes(
        tmp_path: Path) -> None:
    """A 2-tile scan (under the lost-in-a-row limit) whose camera never answered went on to
    stitch nothing and failed with "ValueError: matmul: Input operand 1 has a mismatch"."""
    from typer.testing import CliRunner

    from scanner.cli import app
    from scanner.pipeline import resume_scan

    recipe = {"sample": {"kind": "rectangle", "width_mm": 1.5, "height_mm": 1.0,
                         "defects": {"count": 0}},
              "microscope": {"kind": "simulated",
                             "camera": {"width": 512, "height": 512, "pixel_size_um": 2.0},
                             "faults": {"camera_timeout_rate": 0.99}},
              "scan": {"overlap": 0.1, "retries": 1}}
    path = tmp_path / "dead_camera.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "s"),
                                   "--no-inspect"])
    assert res.exit_code == 1
    assert "none of the 2 planned tiles was acquired" in res.output
    scan = _scan(tmp_path / "s")
    assert scan["status"] == "failed" and scan["acquired_tiles"] == 0
    assert "none of the 2 planned tiles" in scan["error"]
    # the camera answers again (the recorded recipe's fault rate put right): resume finishes
    scan["recipe"]["microscope"]["faults"]["camera_timeout_rate"] = 0.0
    (tmp_path / "s" / "scan.json").write_text(json.dumps(scan))
    assert resume_scan(tmp_path / "s").status == "complete"


def test_an_overwrite_refused_before_its_first_tile_keeps_the_earlier_scan(
        tmp_path: Path) -> None:
    """`run --out OLD --overwrite` deleted the earlier scan before the new one was refused
    (a wafer not where the recipe puts it: no edge found): only the refusal's scan.json and
    alignment.png were left."""
    from scanner.acquisition import align
    from scanner.errors import UserError
    from scanner.recipe import parse_recipe

    data = json.loads(json.dumps(SMALL))
    data["scan"].update(align=False)
    first = run_scan(parse_recipe(data, tmp_path, "first"), tmp_path / "scan")
    before = {p.relative_to(first.folder): p.read_bytes()
              for p in first.folder.rglob("*") if p.is_file()}
    misplaced = json.loads(json.dumps(SMALL))
    misplaced["sample"]["placement"] = {"offset_um": [20000, 0]}  # off the 20 mm wafer's place
    misplaced["scan"].update(align=True)
    with pytest.raises(UserError, match="center_um") as refused:
        run_scan(parse_recipe(misplaced, tmp_path, "misplaced"), tmp_path / "scan",
                 overwrite=True)
    after = {p.relative_to(first.folder): p.read_bytes()
             for p in first.folder.rglob("*") if p.is_file()}
    # the refusal says to see the picture of what its alignment saw: kept beside the earlier
    # scan, which is as it was (the picture it cited was the earlier scan's own)
    picture = Path(align.REFUSED_ALIGNMENT_PNG)
    assert after.pop(picture)[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(first.folder / picture) in str(refused.value)
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan"]  # nothing left aside
    # an overwrite that starts replaces it, and leaves nothing aside either; what the user
    # kept in the folder is kept (their recipe was deleted with the scan)
    (first.folder / "my_recipe.yaml").write_text("notes\n")
    second = run_scan(parse_recipe(data, tmp_path, "second"), tmp_path / "scan",
                      overwrite=True)
    assert second.status == "complete" and _scan(second.folder)["recipe"]["name"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan"]
    assert (second.folder / "my_recipe.yaml").read_text() == "notes\n"
    assert not (second.folder / picture).exists()  # the refused run's, not this scan's


def test_every_name_a_scan_writes_is_one_run_overwrite_replaces() -> None:
    """A scan output missing from SCAN_OUTPUTS would be carried from a replaced scan into the
    new one, as a user's file is."""
    from scanner import defectlist, scanfolder, tilestore
    from scanner.acquisition import align, focusreport
    from scanner.inspection import images
    from scanner.reports import klarf, repeaters, wafermap
    from scanner.stitching import stitch

    written = {tilestore.TILES_ZARR, tilestore.TILES_CSV, align.ALIGNMENT_PNG,
               align.REFUSED_ALIGNMENT_PNG,
               focusreport.FOCUS_JSON, focusreport.FOCUS_PNG, images.SCORES_CSV,
               scanfolder.SCAN_JSON, scanfolder.TRUTH_JSON, scanfolder.MOSAIC, klarf.KLARF,
               repeaters.REPEATERS_JSON, wafermap.WAFERMAP, stitch.FLATFIELD,
               defectlist.DEFECTS_JSON, defectlist.DEFECTS_CSV, *defectlist.MAP_NAMES.values()}
    assert written <= scanfolder.SCAN_OUTPUTS


def test_report_of_a_scan_run_without_inspection_says_to_inspect_it(tmp_path: Path) -> None:
    """It said the inspect stage "did not finish" and to run `resume`, which answered that the
    scan was complete and had nothing to resume."""
    from scanner.recipe import parse_recipe

    data = json.loads(json.dumps(SMALL))
    data["scan"].update(align=False)
    folder = run_scan(parse_recipe(data, tmp_path, "plain"), tmp_path / "scan").folder
    res = CliRunner().invoke(app, ["report", str(folder)])
    assert res.exit_code == 2
    assert "--no-inspect" in res.output and "waferscope inspect" in res.output
    assert "resume" not in res.output


def test_a_scan_another_process_is_still_working_on_is_not_restitched_or_inspected(
        plain_scan: Path, tmp_path: Path) -> None:
    """stitch, inspect and report ran (exit 0) on a scan whose scan.json said a live process
    was inspecting it, writing its outputs underneath that process; resume already refused."""
    import shutil

    folder = tmp_path / "scan"
    shutil.copytree(plain_scan, folder)
    # a process working on a scan holds its folder (scanner.scanfolder.hold)
    holder = ("import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); "
              "lock.acquire(); print('held', flush=True); time.sleep(60)")
    busy = subprocess.Popen([sys.executable, "-c", holder, str(folder / ".waferscope.lock")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout.readline().strip() == "held"
        scan = {**_scan(folder), "status": "inspecting",
                "process": {"pid": busy.pid, "host": _scan(folder)["process"]["host"]}}
        (folder / "scan.json").write_text(json.dumps(scan))
        mosaic = sorted(p.stat().st_mtime for p in (folder / "mosaic.ome.zarr").rglob("*"))
        recipe = _recipe(tmp_path)
        for args in (["stitch"], ["inspect"], ["report"], ["resume"],
                     ["run", str(recipe), "--overwrite", "--out"]):
            res = CliRunner().invoke(app, [*args, str(folder)])
            assert res.exit_code == 2, (args, res.output)
            assert "still inspecting" in res.output or \
                "another waferscope process is working" in res.output, (args, res.output)
        assert sorted(p.stat().st_mtime for p in (folder / "mosaic.ome.zarr").rglob("*")) \
            == mosaic
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.parametrize("process", ["live, not ours", "another computer's"])
def test_a_running_status_whose_process_holds_nothing_is_over(
        plain_scan: Path, tmp_path: Path, process: str) -> None:
    """A status left running by a process id that now names another program (after a reboot),
    or recorded by another computer, refused the scan for ever: "the scan is still
    inspecting (process 4242 is alive); wait for it", though nothing held the folder."""
    folder = tmp_path / "scan"
    shutil.copytree(plain_scan, folder)
    recorded = {"pid": os.getppid(), "host": _scan(folder)["process"]["host"]} \
        if process.startswith("live") else {"pid": 4242, "host": "another-lab-pc"}
    scan = {**_scan(folder), "status": "inspecting", "process": recorded}
    (folder / "scan.json").write_text(json.dumps(scan))
    assert effective_status(scan) == "inspecting"  # the process alone cannot tell
    res = runner.invoke(app, ["stitch", str(folder)])
    assert res.exit_code == 0, res.output
    assert _scan(folder)["status"] == "complete"  # (run without inspection: the mosaic ends it)


def test_two_commands_on_one_scan_are_kept_apart(plain_scan: Path, tmp_path: Path) -> None:
    """`batch` and `inspect` (or `batch` and `resume`) at once on one scan wrote the same
    temporary stores under each other: batch exited 0 with half-filled maps."""
    from scanner.scanfolder import hold

    folder = tmp_path / "scan"
    shutil.copytree(plain_scan, folder)
    before = _scan(folder)
    recipe = _recipe(tmp_path)
    with hold(folder):  # as another process working on it would
        for args in (["stitch", str(folder)], ["inspect", str(folder)],
                     ["resume", str(folder)], ["batch", str(folder)],
                     ["run", str(recipe), "--out", str(folder), "--overwrite"]):
            res = runner.invoke(app, args)
            assert res.exit_code == 2, (args, res.output)
            assert "another waferscope process is working on this scan" in res.output, args
    assert _scan(folder) == before and folder.is_dir()
    assert runner.invoke(app, ["stitch", str(folder)]).exit_code == 0  # released


def test_a_stage_run_alone_shows_in_scan_json_and_finishes_a_stopped_scan(
        plain_scan: Path, tmp_path: Path) -> None:
    """stitch, inspect, report and batch wrote no status or process to scan.json (so `resume`
    and `run --overwrite` could start on the scan beneath them), and a stopped scan they
    finished stayed `interrupted`."""
    from scanner.integrity import claim
    from scanner.pipeline import resume_scan

    folder = tmp_path / "scan"
    shutil.copytree(plain_scan, folder)
    scan = {**_scan(folder), "status": "interrupted", "error": "SIGTERM"}
    (folder / "scan.json").write_text(json.dumps(scan))
    with pytest.raises(KeyboardInterrupt), claim(folder, "stitch"):
        now = _scan(folder)
        assert now["status"] == "stitching" and now["process"]["pid"] == os.getpid()
        assert effective_status(now) == "stitching"
        raise KeyboardInterrupt
    assert _scan(folder)["status"] == "interrupted"  # stopped: as it was
    with claim(folder, "stitch") as working:
        working("inspecting")
        assert _scan(folder)["status"] == "inspecting"
        with pytest.raises(Exception, match="another waferscope process"):
            resume_scan(folder)
    # the scan was run without inspection: its mosaic is its last output
    after = _scan(folder)
    assert after["status"] == "complete" and "error" not in after
    assert after["acquired_tiles"] == after["plan"]["n_tiles"]
    # a scan that ended whole keeps its status
    with claim(folder, "stitch"):
        pass
    assert _scan(folder)["status"] == "complete"


def test_overwrite_and_resume_clear_a_scan_set_aside_by_a_killed_run(
        plain_scan: Path, tmp_path: Path) -> None:
    """`run --overwrite` killed -9 before its first tile left `.NAME.replaced-PID` (the old
    scan) for ever, beside the new scan that `resume` finished."""
    from scanner.pipeline import resume_scan

    data = json.loads(json.dumps(SMALL))
    data["scan"].update(align=False)
    folder = tmp_path / "scan"
    for finish in ("run", "resume"):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(plain_scan, folder)
        aside = tmp_path / ".scan.replaced"  # the earlier scan the killed run set aside
        shutil.copytree(plain_scan, aside)
        (aside / "notes.txt").write_text("kept\n")
        if finish == "run":
            result = run_scan(parse_recipe(data, tmp_path, "again"), folder, overwrite=True)
        else:
            scan = {**_scan(folder), "status": "interrupted"}
            (folder / "scan.json").write_text(json.dumps(scan))
            (folder / "tiles.csv").write_text(
                "".join((folder / "tiles.csv").read_text().splitlines(True)[:-2]))
            result = resume_scan(folder)
        assert result.status == "complete", finish
        assert sorted(p.name for p in tmp_path.iterdir() if "scan" in p.name) == ["scan"]
        assert (folder / "notes.txt").read_text() == "kept\n", finish
    # stopped before its first tile: a command that refuses the new scan says where the one it
    # replaces is (it said only "run resume", which deletes that one at the first tile)
    scan = {**_scan(folder), "status": "interrupted"}
    (folder / "scan.json").write_text(json.dumps(scan))
    (folder / "tiles.csv").write_text((folder / "tiles.csv").read_text().splitlines(True)[0])
    shutil.copytree(plain_scan, tmp_path / ".scan.replaced")
    res = runner.invoke(app, ["report", str(folder)])
    assert res.exit_code == 2, res.output
    assert f"this one replaces is kept in {tmp_path / '.scan.replaced'}" in res.stderr


def test_a_run_stopped_while_aligning_is_interrupted_and_an_overwrite_says_what_it_kept(
        tmp_path: Path, monkeypatch) -> None:
    """SIGTERM during alignment recorded `failed`; stopping a `run --overwrite` then put the
    earlier scan back, while the message said to resume it."""
    import scanner.pipeline

    data = json.loads(json.dumps(SMALL))
    data["scan"].update(align=False)
    first = run_scan(parse_recipe(data, tmp_path, "first"), tmp_path / "scan").folder
    before = _scan(first)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scanner.pipeline, "align", stopped)
    recipe = tmp_path / "aligned.yaml"
    recipe.write_text(yaml.safe_dump({**SMALL, "name": "aligned"}))
    res = runner.invoke(app, ["run", str(recipe), "--out", str(first), "--overwrite"])
    assert res.exit_code == 130
    assert "stopped before the first tile" in res.output and "resume" not in res.output
    assert _scan(first) == before
    res = runner.invoke(app, ["run", str(recipe), "--out", str(tmp_path / "new")])
    assert res.exit_code == 130 and "waferscope resume" in res.output
    assert _scan(tmp_path / "new")["status"] == "interrupted"


def test_a_fusion_stopped_midway_leaves_no_half_written_store(plain_scan: Path,
                                                             tmp_path: Path,
                                                             monkeypatch) -> None:
    import scanner.stitching.mosaic
    from scanner.pipeline import restitch

    folder = tmp_path / "scan"
    shutil.copytree(plain_scan, folder)
    mosaic = sorted(p.stat().st_mtime for p in (folder / "mosaic.ome.zarr").rglob("*"))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scanner.stitching.mosaic, "_fill_levels", stopped)
    with pytest.raises(KeyboardInterrupt):
        restitch(folder)
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]
    assert sorted(p.stat().st_mtime for p in (folder / "mosaic.ome.zarr").rglob("*")) == mosaic


def test_view_of_a_scan_not_yet_stitched_says_so(plain_scan: Path, tmp_path: Path) -> None:
    """It opened an empty canvas (exit 0, an empty screenshot)."""
    folder = tmp_path / "scan"
    shutil.copytree(plain_scan, folder)
    shutil.rmtree(folder / "mosaic.ome.zarr")
    res = runner.invoke(app, ["view", str(folder), "--screenshot", str(tmp_path / "s.png")])
    assert res.exit_code == 2 and "no mosaic.ome.zarr yet" in res.output
    assert not (tmp_path / "s.png").exists()


def _klarf_n_defects(folder: Path) -> int:
    lines = (folder / "defects.klarf").read_text().splitlines()
    return int(lines[lines.index("SummaryList") + 1].split()[1])


def test_inspect_of_a_scan_remakes_its_reports(reference: Path, tmp_path: Path) -> None:
    """`inspect SCAN` wrote a new defects.json beside the KLARF and wafer map of the earlier
    defects; `scan.json` stays as a whole run left it."""
    folder = tmp_path / "scan"
    shutil.copytree(reference, folder)
    n_before = len(_defects(folder))
    assert n_before > 0 and _klarf_n_defects(folder) == n_before
    # the reports of earlier defects (here: of a list with the first defect dropped)
    (folder / "defects.klarf").write_text((folder / "defects.klarf").read_text().replace(
        f"SummaryList\n 1 {n_before} ", f"SummaryList\n 1 {n_before - 1} "))
    assert _klarf_n_defects(folder) == n_before - 1
    (folder / "wafermap.png").write_bytes(b"stale")
    res = runner.invoke(app, ["inspect", str(folder)])
    assert res.exit_code == 0, res.output
    assert "defects.klarf" in res.output and "wafermap.png" in res.output
    assert _klarf_n_defects(folder) == len(_defects(folder)) == n_before
    assert (folder / "wafermap.png").read_bytes()[:4] == b"\x89PNG"
    assert _scan(folder)["status"] == "complete"
    # inspected into another folder, the scan's own outputs stay as they were
    klarf = (folder / "defects.klarf").read_bytes()
    res = runner.invoke(app, ["inspect", str(folder), "--out", str(tmp_path / "elsewhere")])
    assert res.exit_code == 0, res.output
    assert (folder / "defects.klarf").read_bytes() == klarf
    assert len(_defects(folder)) == n_before


def test_a_sigterm_that_lands_in_a_callback_is_not_lost() -> None:
    """SIGTERM during inspection was printed as "Exception ignored in: WeakKeyDictionary" and
    the scan ran on to its end: the KeyboardInterrupt was raised inside a weak reference's
    callback, where Python discards exceptions."""
    import weakref

    from scanner.cli import install_signal_handlers

    before = signal.getsignal(signal.SIGTERM), sys.unraisablehook
    install_signal_handlers()
    try:
        class Thing:
            pass

        def callback(_ref) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(200_000):  # the handler runs here, inside the callback
                pass

        thing = Thing()
        ref = weakref.ref(thing, callback)
        with pytest.raises(KeyboardInterrupt):
            del thing
            for _ in range(2000):
                time.sleep(0.001)
        assert ref() is None
    finally:
        signal.signal(signal.SIGTERM, before[0])
        sys.unraisablehook = before[1]


def test_the_mosaic_of_a_scan_is_inspected_as_the_scan(reference: Path, tmp_path: Path
                                                       ) -> None:
    """`inspect S/mosaic.ome.zarr` wrote into S with no lock and no status (two at once: 5
    defects of 7, a .tmp store left) and replaced its located defect list with a bare one."""
    from scanner.scanfolder import hold

    folder = tmp_path / "scan"
    shutil.copytree(reference, folder)
    header = json.loads((folder / "defects.json").read_text())["header"]
    with hold(folder):
        res = runner.invoke(app, ["inspect", str(folder / "mosaic.ome.zarr")])
        assert res.exit_code == 2 and "another waferscope process" in res.output
    res = runner.invoke(app, ["inspect", str(folder / "mosaic.ome.zarr")])
    assert res.exit_code == 0 and "defects.klarf" in res.output, res.output
    after = json.loads((folder / "defects.json").read_text())["header"]
    assert set(header) <= set(after)  # located as before: dies, sample, coordinates
    assert _defects(folder) == _defects(reference)
    # another store of the scan is not written over as a mosaic
    res = runner.invoke(app, ["inspect", str(folder / "anomaly.ome.zarr")])
    assert res.exit_code == 2 and "--out" in res.output


def test_a_run_stopped_right_after_taking_its_folder_leaves_no_dead_end(
        plain_scan: Path, tmp_path: Path) -> None:
    """A run stopped between locking its new folder and writing scan.json left a folder
    holding only the lock, which run, run --overwrite and resume all refused, and a replaced
    scan set aside for good."""
    from scanner.scanfolder import LOCK

    data = json.loads(json.dumps(SMALL))
    data["scan"].update(align=False)
    recipe = parse_recipe(data, tmp_path, "small")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / LOCK).write_text("")
    assert run_scan(recipe, bare).status == "complete"
    # the same with an earlier scan set aside: it comes back, and is replaced only on request
    shutil.copytree(plain_scan, tmp_path / ".old.replaced")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / LOCK).write_text("")
    with pytest.raises(Exception, match="not empty"):
        run_scan(recipe, tmp_path / "old")
    assert _scan(tmp_path / "old") == _scan(plain_scan)
    assert not (tmp_path / ".old.replaced").exists()


def test_an_overwrite_through_a_symbolic_link_replaces_the_folder_it_points_to(
        plain_scan: Path, tmp_path: Path) -> None:
    """The link was replaced by a folder, a `.link.replaced` link left, and the next
    overwrite failed (exit 1, NotADirectoryError)."""
    data = json.loads(json.dumps(SMALL))
    data["scan"].update(align=False)
    real = tmp_path / "real"
    shutil.copytree(plain_scan, real)
    (tmp_path / "link").symlink_to(real)
    for _ in range(2):
        result = run_scan(parse_recipe(data, tmp_path, "again"), tmp_path / "link",
                          overwrite=True)
        assert result.status == "complete"
        assert (tmp_path / "link").is_symlink() and (real / "scan.json").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_stopped_while_its_stores_are_created_nothing_is_left(plain_scan: Path,
                                                              tmp_path: Path,
                                                              monkeypatch) -> None:
    import scanner.ngff
    from scanner.pipeline import restitch

    folder = tmp_path / "scan"
    shutil.copytree(plain_scan, folder)
    real = scanner.ngff._create_levels

    def stopped(tmp, *args):
        real(tmp, *args)  # the store is there, empty
        raise KeyboardInterrupt

    monkeypatch.setattr(scanner.ngff, "_create_levels", stopped)
    with pytest.raises(KeyboardInterrupt):
        restitch(folder)
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]


def test_an_inspection_stopped_leaves_the_scan_to_finish_again(reference: Path,
                                                               tmp_path: Path,
                                                               monkeypatch) -> None:
    """Stopped while writing its reports, `inspect` put the status back to complete over a
    new defect list and the old wafer map."""
    import scanner.reports

    folder = tmp_path / "scan"
    shutil.copytree(reference, folder)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scanner.reports, "report", stopped)
    res = runner.invoke(app, ["inspect", str(folder)])
    assert res.exit_code == 130
    assert _scan(folder)["status"] == "interrupted"
    monkeypatch.undo()
    assert runner.invoke(app, ["inspect", str(folder)]).exit_code == 0
    assert _scan(folder)["status"] == "complete"


def test_a_run_stopped_before_its_folder_says_nothing_was_written(tmp_path: Path,
                                                                  monkeypatch) -> None:
    import scanner.pipeline

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scanner.pipeline, "make_plan", stopped)
    res = runner.invoke(app, ["run", str(_recipe(tmp_path)), "--out", str(tmp_path / "s")])
    assert res.exit_code == 130 and "nothing was written" in res.output
    assert "resume" not in res.output and not (tmp_path / "s").exists()


def test_a_scan_killed_while_acquiring_says_how_many_tiles_it_took(tmp_path: Path) -> None:
    """kill -9 left `acquired_tiles: 0` in scan.json until the scan was resumed."""
    from scanner.pipeline import COUNT_EVERY_S

    out = tmp_path / "scan"
    proc = subprocess.Popen([*WAFERSCOPE, "run", str(_recipe(tmp_path, realtime=True)),
                             "--no-inspect", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = _started(out)
        deadline = time.monotonic() + 60
        while not (out / "tiles.csv").is_file() or len(_ok_rows(out)) < 3 \
                or time.perf_counter() - started < COUNT_EVERY_S:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    scan = _scan(out)
    assert scan["status"] == "acquiring"  # killed while acquiring (reads as interrupted)
    assert 1 <= scan["acquired_tiles"] <= len(_ok_rows(out)) < scan["plan"]["n_tiles"]


def test_resume_refuses_a_model_gone_since_before_the_stage_moves(plain_scan: Path,
                                                                 tmp_path: Path) -> None:
    """`run` loads its model before the stage moves; `resume` found it gone only after
    taking and stitching every missing tile."""
    folder = tmp_path / "scan"
    shutil.copytree(plain_scan, folder)
    scan = _scan(folder)
    gone = tmp_path / "models" / "m.safetensors"
    scan.update(status="interrupted", options={"inspect": True, "model": str(gone)})
    (folder / "scan.json").write_text(json.dumps(scan))
    lines = (folder / "tiles.csv").read_text().splitlines(keepends=True)
    (folder / "tiles.csv").write_text("".join(lines[:-2]))  # two tiles left to take
    journal = (folder / "tiles.csv").read_bytes()
    res = runner.invoke(app, ["resume", str(folder)])
    assert res.exit_code == 2 and "m.safetensors" in res.output, res.output
    assert (folder / "tiles.csv").read_bytes() == journal  # nothing taken
    assert _scan(folder)["status"] == "interrupted"


def test_resume_refuses_an_image_sample_whose_picture_changed(tmp_path: Path) -> None:
    """The picture of an image sample overwritten between a kill and its resume: the new
    tiles showed the other picture and were stitched in with the rest (exit 0)."""
    import tifffile
    from conftest import scan_of_image
    from scipy import ndimage

    rng = np.random.default_rng(0)
    picture = ndimage.gaussian_filter(rng.random((600, 600)), 3)
    picture = (picture - picture.min()) / np.ptp(picture)
    folder = scan_of_image(tmp_path, picture, camera_px=256)
    scan = _scan(folder)
    assert scan["sample_file"]["sha256"]
    scan["status"] = "interrupted"
    (folder / "scan.json").write_text(json.dumps(scan))
    lines = (folder / "tiles.csv").read_text().splitlines(keepends=True)
    (folder / "tiles.csv").write_text("".join(lines[:-2]))  # two tiles left to take
    journal = (folder / "tiles.csv").read_bytes()
    tifffile.imwrite(tmp_path / "sample.tif",
                     np.round((1 - picture) * 65535).astype(np.uint16))
    res = runner.invoke(app, ["resume", str(folder)])
    assert res.exit_code == 2 and "sample.path" in res.output and "changed" in res.output
    assert (folder / "tiles.csv").read_bytes() == journal
    # the picture put back: the scan resumes
    tifffile.imwrite(tmp_path / "sample.tif", np.round(picture * 65535).astype(np.uint16))
    res = runner.invoke(app, ["resume", str(folder)])
    assert res.exit_code == 0, res.output
    assert _scan(folder)["status"] == "complete"


def test_resume_refuses_a_microscope_that_now_images_at_another_scale(tmp_path: Path) -> None:
    """The calibration file rewritten (or another objective's pixel-size preset) between a
    stop and its resume: the missing tiles were taken at 10.3 um/px, on a grid moved for it,
    into a mosaic of 10 um pixels (exit 0)."""
    data = json.loads(json.dumps(SMALL))
    calibration = tmp_path / "cal.json"
    calibration.write_text(json.dumps({"pixel_size_um": 10.0, "rotation_deg": 0.0}))
    data["microscope"]["calibration"] = str(calibration)
    data["scan"]["align"] = False
    result = run_scan(parse_recipe(data, tmp_path, "cal"), tmp_path / "scan")
    folder = result.folder
    scan = _scan(folder)
    scan["status"] = "interrupted"
    (folder / "scan.json").write_text(json.dumps(scan))
    lines = (folder / "tiles.csv").read_text().splitlines(keepends=True)
    (folder / "tiles.csv").write_text("".join(lines[:-2]))  # two tiles left to take
    journal = (folder / "tiles.csv").read_bytes()
    calibration.write_text(json.dumps({"pixel_size_um": 10.3, "rotation_deg": 0.0}))
    res = runner.invoke(app, ["resume", str(folder)])
    assert res.exit_code == 2 and "pixel size changed" in res.output, res.output
    assert "10.0 um recorded, 10.3 um now" in res.output
    assert (folder / "tiles.csv").read_bytes() == journal
    calibration.write_text(json.dumps({"pixel_size_um": 10.0, "rotation_deg": 0.0}))
    res = runner.invoke(app, ["resume", str(folder)])
    assert res.exit_code == 0, res.output
    assert _scan(folder)["status"] == "complete"


def test_an_overwrite_killed_while_aligning_gives_the_earlier_scan_back(
        plain_scan: Path, tmp_path: Path) -> None:
    """`run --overwrite` killed -9 while it aligned (its record written, no tile taken): the
    next run took the earlier, complete scan set aside for one that had started, and deleted
    it without a word."""
    from scanner.errors import UserError
    from scanner.scanfolder import prepare_folder

    folder = tmp_path / "scan"
    aside = tmp_path / ".scan.replaced"
    shutil.copytree(plain_scan, aside)  # the earlier scan, set aside by the killed run
    folder.mkdir()
    killed = {**_scan(plain_scan), "status": "aligning", "process": {"pid": 999999999}}
    (folder / "scan.json").write_text(json.dumps(killed))
    with pytest.raises(UserError, match="not empty"):  # without --overwrite: it is back
        prepare_folder(folder, tmp_path, "scan")
    assert not aside.exists() and _scan(folder) == _scan(plain_scan)
    # with --overwrite the earlier scan is set aside again, for the new run
    shutil.rmtree(folder)
    shutil.copytree(plain_scan, aside)
    folder.mkdir()
    (folder / "scan.json").write_text(json.dumps(killed))
    out, kept = prepare_folder(folder, tmp_path, "scan", overwrite=True)
    assert kept == aside and _scan(aside) == _scan(plain_scan)
    assert list(out.iterdir()) == []


def test_a_full_disk_met_by_resume_names_the_scan_and_offers_resume(plain_scan: Path) -> None:
    import errno

    from scanner.cli_common import _output_named, _storage_message

    # a library's write named no file: "error: cannot write (No space left on device); free
    # space or choose another folder", neither where nor that resume goes on
    full = OSError(errno.ENOSPC, "No space left on device")
    line = _storage_message(full, _output_named({"scan": plain_scan, "dask": None}),
                            acquiring=True)
    assert line.startswith(f"{plain_scan}: cannot write") and "waferscope resume" in line


def test_an_overwrite_that_acquires_no_tile_keeps_the_earlier_scan(tmp_path: Path) -> None:
    """`run --out OLD --overwrite` with a camera that gives no frame deleted the complete
    earlier scan before its first tile and left a `failed` scan of lost tiles only in its
    place: the earlier scan goes at the new scan's first tile stored, not before."""
    from devices.errors import HardwareError
    from scanner.errors import UserError
    from scanner.scanfolder import prepare_folder

    data = json.loads(json.dumps(SMALL))
    data["scan"].update(align=False)
    first = run_scan(parse_recipe(data, tmp_path, "first"), tmp_path / "scan")
    (first.folder / "notes.txt").write_text("mine\n")
    before = {p.relative_to(first.folder): p.read_bytes()
              for p in first.folder.rglob("*") if p.is_file()}
    dead = json.loads(json.dumps(data))
    dead["microscope"]["faults"] = {"camera_timeout_rate": 0.99, "seed": 1}
    dead["scan"].update(retries=0)
    with pytest.raises(HardwareError, match="earlier scan in .* is kept") as failed:
        run_scan(parse_recipe(dead, tmp_path, "dead"), tmp_path / "scan", overwrite=True)
    assert "resume" not in str(failed.value)  # not the new scan to resume: it is gone
    after = {p.relative_to(first.folder): p.read_bytes()
             for p in first.folder.rglob("*") if p.is_file()}
    assert after == before
    assert _scan(first.folder)["status"] == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan"]  # nothing left aside
    # killed -9 after lost tiles only: the next run puts the earlier scan back, as it does
    # for one killed before its first tile
    aside = tmp_path / ".scan.replaced"
    first.folder.rename(aside)
    (tmp_path / "scan").mkdir()
    (tmp_path / "scan" / "tiles.csv").write_text(
        "index,row,col,x_um,y_um,z_um,time_s,status\r\n0,0,0,0,0,0,0.1,lost: no frame\r\n")
    with pytest.raises(UserError, match="not empty"):
        prepare_folder(tmp_path / "scan", tmp_path, "again")
    assert not aside.exists() and _scan(tmp_path / "scan")["status"] == "complete"


def test_a_scan_folder_given_as_dot_has_its_set_aside_place_beside_it(tmp_path, monkeypatch):
    # `waferscope inspect .` in a scan folder failed with "PosixPath('.') has an empty name"
    from scanner.scanfolder import set_aside_path

    scan = tmp_path / "scan1"
    (scan / "sub").mkdir(parents=True)
    monkeypatch.chdir(scan)
    assert set_aside_path(Path(".")) == tmp_path / ".scan1.replaced"
    assert set_aside_path(Path("sub/..")) == tmp_path / ".scan1.replaced"
