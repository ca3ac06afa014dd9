"""What a stage may be run on: refuse scans that are unfinished or damaged.

``stitch``, ``inspect`` and ``report`` run on a scan folder only when what they read is whole:
every planned tile acquired (unless the user accepts an incomplete scan) and every journaled
tile's data in the store. A damaged store is refused whatever the options: a missing chunk
would otherwise be read as a black tile.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from devices.spec import MISSING_FILE
from scanner.defectlist import DEFECTS_JSON, MAP_NAMES
from scanner.errors import UserError, damaged_message, undecodable
from scanner.recipe import RecipeError, parse_recipe
from scanner.scanfolder import (
    MOSAIC,
    RUNNING,
    SCAN_JSON,
    hold,
    now_iso,
    read_scan_json,
    running_status,
    set_aside_path,
    this_process,
    write_json,
)
from scanner.tilestore import (
    TILES_ZARR,
    check_journal,
    check_recorded_camera,
    decodable_tiles,
    open_tiles,
    stored_tiles,
)
from simulators.errors import first_line

log = logging.getLogger("waferscope.integrity")

#: the stage a command reads from, by command (``batch`` stitches, inspects and reports)
_NEEDS = {"stitch": "acquire", "inspect": "stitch", "report": "inspect", "batch": "acquire"}
_OUTPUT = {"stitch": MOSAIC, "inspect": DEFECTS_JSON}
#: the status a scan shows while a command works on it, by command
_WORKING = {"stitch": "stitching", "inspect": "inspecting", "report": "reporting",
            "batch": "stitching"}
#: how a scan ends whole (what a run's last stage writes, see scanner.pipeline)
_ENDED = ("complete", "incomplete")


@contextmanager
def claim(folder: Path, command: str, *, allow_incomplete: bool = False, write: bool = True
          ) -> Iterator[Callable[[str], None]]:
    """Hold a scan folder for a command that runs stages on it alone (``stitch``,
    ``inspect``, ``report``, ``batch``), as ``run`` and ``resume`` hold theirs.

    The folder is locked (:func:`scanner.scanfolder.hold`) and checked
    (:func:`require_ready`). With ``write``, ``scan.json`` shows the stage running and this
    process while it runs, so that ``resume``, ``run --overwrite`` and the other commands
    refuse it; when the command ends, the status it had comes back, or, once the command
    wrote the scan's last outputs (the reports; the mosaic of a scan run without
    inspection), the status a run ends with: a stopped scan finished this way is
    ``complete`` (or ``incomplete``), not ``interrupted`` for ever. An ``inspect``,
    ``report`` or ``batch`` stopped (Ctrl-C, SIGTERM) leaves it ``interrupted``: its outputs
    are replaced one by one, and some may be new, some old.

    Yields
    ------
    callable
        ``working(status)`` records the stage that now runs (``"inspecting"``, ...).

    Raises
    ------
    UserError
        As :func:`require_ready`, or when another process holds the folder.
    """
    folder = Path(folder)
    _ready(folder, command, allow_incomplete)  # refused before a lock file is made in it
    with hold(folder, write=write) as held:
        scan, n_ok, n_planned = _ready(folder, command, allow_incomplete,
                                       held_here=held)  # as it is now
        # inspect reads no raw tile, but the user must know; report, which reads only the
        # defect list, does not decode every tile for it (seconds on a large wafer)
        if command == "inspect":
            damage = damaged_raw_tiles(folder, n_planned)
            if damage is not None:
                log.warning("%s", damage)
        if not write:
            yield lambda status: None
            return
        before = _status_before(folder, scan, held)
        for stale in folder.glob("*.tmp.zarr"):
            # a store a killed command was writing (kill -9 leaves it; no one else writes
            # here now, the folder is held): left for ever when the next command was report
            shutil.rmtree(stale, ignore_errors=True)
        record = folder / SCAN_JSON
        original_bytes, original_stat = record.read_bytes(), record.stat()

        def working(status: str) -> None:
            _update(folder, status=status, process=this_process())

        # with what this command replaced, for the next one should this process die (kill -9)
        _update(folder, status=_WORKING[command], process=this_process(),
                claimed={"command": command, "status": before, "process": this_process()})
        try:
            yield working
        except BaseException as exc:
            stopped = isinstance(exc, (KeyboardInterrupt, SystemExit))
            # a mosaic is replaced whole or not at all; the maps, the defect list and the
            # reports one by one: stopped among them, the scan is left to finish again
            # (`resume`, or the command); refused (damaged data) before any was written
            # and the process that ran the scan before (a refused command leaves no trace)
            _update(folder, status="interrupted" if stopped and command != "stitch" else before,
                    process=scan.get("process"), claimed=None)
            if record.read_bytes() == original_bytes:  # as it was: its time too (backups look)
                os.utime(record, ns=(original_stat.st_atime_ns, original_stat.st_mtime_ns))
            raise
        if before not in _ENDED and _ends_scan(command, scan):
            _update(folder, status="complete" if n_ok == n_planned else "incomplete",
                    finished=now_iso(), acquired_tiles=n_ok, error=None, claimed=None)
        else:
            _update(folder, status=before, claimed=None)


def _status_before(folder: Path, scan: dict[str, Any], held: bool) -> str:
    """The scan's status as a command finds it. A ``stitch`` command that died (``kill -9``)
    replaced the mosaic whole or not at all, as one stopped by Ctrl-C, which gives the status
    back: its ``claimed`` record gives back the status it replaced (a complete scan stayed
    ``interrupted`` until it was resumed, inspected or reported again)."""
    status = running_status(folder, scan, held_here=held)
    claimed = scan.get("claimed")
    if status == "interrupted" and isinstance(claimed, dict) and \
            claimed.get("command") == "stitch" and claimed.get("process") == scan.get("process") \
            and claimed.get("status") in _ENDED:
        return str(claimed["status"])
    return status


def _ends_scan(command: str, scan: dict[str, Any]) -> bool:
    """Whether ``command`` writes the last outputs a run of ``scan`` would have written."""
    inspects = bool((scan.get("options") or {}).get("inspect", True))
    return command in ("report", "batch", "inspect") or (command == "stitch" and not inspects)


def _update(folder: Path, **fields: Any) -> None:
    """Set fields of ``scan.json`` (None removes one), as it is now on disk."""
    scan = read_scan_json(folder)
    for key, value in fields.items():
        if value is None:
            scan.pop(key, None)
        else:
            scan[key] = value
    write_json(folder / SCAN_JSON, scan)


def require_ready(folder: Path, command: str, *, allow_incomplete: bool | None = False
                  ) -> dict[str, Any]:
    """Check that a scan folder can be given to ``command``; return its ``scan.json``.

    Parameters
    ----------
    folder : Path
        Scan folder.
    command : {"stitch", "inspect", "report", "batch"}
        What is about to run.
    allow_incomplete : bool or None
        Accept a scan whose acquisition did not take every planned tile
        (``--allow-incomplete``); damage is refused all the same. None: never, and the
        command has no such option to offer (``train``: a good scan is learnt from whole).

    Raises
    ------
    UserError
        One line naming the scan's status, the missing tiles or the damaged tile.
    """
    return _ready(folder, command, allow_incomplete)[0]


def _ready(folder: Path, command: str, allow_incomplete: bool | None, *,
           held_here: bool = False) -> tuple[dict[str, Any], int, int]:
    """:func:`require_ready`'s check: the scan, its tiles acquired and planned
    (``held_here``: this process holds the folder)."""
    folder = Path(folder)
    scan = read_scan_json(folder)
    check_recorded_recipe(folder, scan)
    status = running_status(folder, scan, held_here=held_here)
    if status in RUNNING:  # its outputs are being written: they would change underneath
        raise UserError(f"{folder}: the scan is still {status} (process "
                        f"{(scan.get('process') or {}).get('pid')} is alive); wait for it")
    # a replacing run stopped before its first tile: where the scan it replaces is
    aside = set_aside_path(folder)
    kept = (f" (the earlier scan this one replaces is kept in {aside}: resume deletes it at "
            "the first tile; to keep it instead, put it back in place of this folder)"
            if aside.is_dir() else "")
    # the mosaic and the defect list are written whole or not at all (renamed into place)
    needed = _NEEDS[command]
    if needed != "acquire" and not (folder / _OUTPUT[needed]).exists():
        if needed == "inspect" and not (scan.get("options") or {}).get("inspect", True):
            # run with --no-inspect: resume has nothing to finish ("complete")
            raise UserError(f"{folder}: scan {status}: no {_OUTPUT[needed]} (it was run "
                            f"with --no-inspect); run `waferscope inspect` on it{kept}")
        raise UserError(f"{folder}: scan {status}: no {_OUTPUT[needed]} (its {needed} stage "
                        f"did not finish); run `waferscope {needed}` or `waferscope "
                        f"resume`{kept}")
    n_planned = planned_tiles(folder, scan)
    plan = scan.get("plan") or {}
    records = check_journal(folder, n_planned, (plan.get("n_rows"), plan.get("n_cols")))
    ok = {r.index for r in records if r.status == "ok"}
    hint = "run `waferscope resume` on it" + ("" if allow_incomplete is None
                                                else ", or pass --allow-incomplete") + kept
    if len(ok) < n_planned and not allow_incomplete:
        missing = sorted(set(range(n_planned)) - ok)
        raise UserError(f"{folder}: scan {status}: {len(ok)} of {n_planned} planned tiles "
                        f"acquired (first missing: tile {missing[0]}); {hint}")
    return scan, len(ok & set(range(n_planned))), n_planned


def damaged_raw_tiles(folder: Path, n_planned: int) -> str | None:
    """The line that warns of raw tiles whose chunk is in the store but does not decode (cut
    short or changed since they were stitched), or None when every stored tile decodes.

    ``inspect`` reads the mosaic, which the stitch stage made from the tiles while they were
    whole, so it goes on; without a word the damage was found only when the raw tiles were
    needed again (``stitch``, which refuses it). Every
    stored tile is read once: some 4 ms a 1024 x 1024 tile, 0.35 s for the 94 tiles of
    ``recipes/demo_wafer.yaml`` (a missing chunk is refused by :func:`require_ready`). A
    store whose metadata differs from the camera's (:func:`~scanner.tilestore.
    check_recorded_camera`) is warned of as such.
    """
    array = open_tiles(folder)
    try:  # a zarr.json edited to another shape or type: every tile would read as damaged
        check_recorded_camera(folder, array)
    except UserError as exc:
        return str(exc)
    stored = {i for i in stored_tiles(array) if i < n_planned}
    damaged = sorted(stored - decodable_tiles(array, stored))
    if not damaged:
        return None
    chunk = Path(folder) / TILES_ZARR / array.metadata.encode_chunk_key((damaged[0], 0, 0))
    more = f" (and {len(damaged) - 1} more tile{'s' if len(damaged) > 2 else ''})" \
        if len(damaged) > 1 else ""
    return (f"{chunk}: raw tile {damaged[0]} cannot be decoded{more}; the mosaic stitched "
            f"before is used as it is; run `waferscope resume {folder}` to take "
            f"{'them' if more else 'it'} again")


def planned_tiles(folder: Path, scan: dict[str, Any]) -> int:
    """How many tiles a scan planned (``plan.n_tiles`` of its ``scan.json``).

    Every stage that reads a scan folder (and ``resume``) counts its tiles from here.

    Raises
    ------
    UserError
        If ``scan.json`` records no plan, or no positive whole number of tiles.
    """
    n = (scan.get("plan") or {}).get("n_tiles")
    # bool is an int to Python, and a float count is not a count
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise UserError(f"{Path(folder) / SCAN_JSON}: records no plan; not a waferscope scan")
    return n


def check_recorded_recipe(folder: Path, scan: dict[str, Any]) -> None:
    """Refuse a scan whose recorded recipe is gone or no longer validates: the stages read
    the sample's outline, die grid and settings from it, and without them would inspect
    everything with the wrong threshold instead of saying the record is damaged.

    A sample or configuration file that has moved since the scan is no damage: the stages
    that need the file say so themselves.

    Raises
    ------
    UserError
        Naming ``scan.json`` and the field.
    """
    where = Path(folder) / SCAN_JSON
    if not isinstance(scan.get("recipe"), dict):
        raise UserError(f"{where}: records no recipe; the scan record is damaged")
    try:
        parse_recipe(scan["recipe"], base_dir=Path(folder))
    except RecipeError as exc:
        if exc.kinds and exc.kinds <= {MISSING_FILE}:
            return
        raise UserError(f"{where} recipe: {exc}; the scan record is damaged (or written by "
                        "another version)") from None


def recorded_pixel_size(folder: Path, scan: dict[str, Any]) -> float:
    """The pixel size a scan's tiles were taken at (``scan.json`` ``microscope.pixel_size_um``,
    written with the plan before the first tile), which the stitch stage places them with.

    Raises
    ------
    UserError
        Naming ``scan.json`` and the field when the record lacks it (a hand-edit removed the
        section: ``stitch`` failed with exit 1, "KeyError: 'microscope'").
    """
    value = (scan.get("microscope") or {}).get("pixel_size_um")
    if value is None:  # its type, where present, is checked by scanner.scanrecord
        raise UserError(f"{Path(folder) / SCAN_JSON}: records no microscope.pixel_size_um; "
                        "the scan record is damaged")
    return float(value)


def _stores(path: Path) -> list[Path]:
    """The Zarr stores a command given ``path`` reads: the store itself, or a scan folder's
    (the mosaic, then the maps, then the raw tiles: the order the stages read them)."""
    path = Path(path)
    if (path / "zarr.json").is_file():
        return [path]
    if not path.is_dir():
        return []
    first = [path / MOSAIC, *(path / name for name in MAP_NAMES.values()),
             path / TILES_ZARR]
    rest = sorted(p for p in path.glob("*.zarr") if p not in first and ".tmp" not in p.name)
    return [p for p in first + rest if (p / "zarr.json").is_file()]


def _arrays(store: Path) -> Iterator[tuple[Path, Any]]:
    """The arrays of a store (an array, or a group's arrays one level down), opened read-only;
    metadata that cannot be read is left to the readers, which name it."""
    import zarr

    for meta in [store / "zarr.json", *sorted(store.glob("*/zarr.json"))]:
        try:
            if json.loads(meta.read_text(encoding="utf-8")).get("node_type") != "array":
                continue
            yield meta.parent, zarr.open_array(str(meta.parent), mode="r")
        except Exception:  # noqa: BLE001,S112 - unreadable metadata: said by the readers
            continue


def find_undecodable_chunk(paths: Iterable[Path]) -> tuple[Path, Path, BaseException] | None:
    """The first stored chunk under ``paths`` (scan folders or Zarr stores) that does not
    decode: ``(store, chunk file, error)``, or None when every chunk decodes.

    The error a codec raises names no file ("Zstd decompression error: invalid input data");
    this is asked only after one was raised, to name the file in the one line the user reads
    (each chunk is read once: a few seconds for a wafer's raw tiles).
    """
    for store in itertools.chain.from_iterable(_stores(Path(p)) for p in paths):
        for where, array in _arrays(store):
            grid = [range(-(-n // c)) for n, c in zip(array.shape, array.chunks, strict=True)]
            for ij in itertools.product(*grid):
                chunk = where / array.metadata.encode_chunk_key(ij)
                if not chunk.is_file():
                    continue  # a missing chunk is refused as such where it is read
                try:
                    array.get_block_selection(ij)
                except Exception as exc:  # noqa: BLE001 - only a chunk that fails to decode
                    if undecodable(exc):
                        return store, chunk, exc
                    raise
    return None


def damaged_data_message(exc: BaseException, where: str | None) -> str:
    """The one line for a chunk that failed to decode (:func:`scanner.errors.undecodable`),
    naming the chunk's file and what writes it again: ``resume`` a raw tile, ``stitch`` the
    mosaic, ``inspect`` a map. ``where``: the inputs the command was given, comma-separated
    (:func:`scanner.errors.damaged_message` is the line when no damaged chunk is found
    there)."""
    paths = [Path(p.strip()) for p in where.split(",")] if where else []
    found = find_undecodable_chunk(paths)
    if found is None:
        return damaged_message(exc, where)
    store, chunk, error = found
    scan = store.parent if (store.parent / SCAN_JSON).is_file() else None
    stem = store.name.split(".")[0]
    if scan is None:
        again = "the image is damaged; write it again"
    elif store.name == TILES_ZARR:
        tile = chunk.relative_to(store).parts[1]
        again = f"raw tile {tile} is damaged; run `waferscope resume {scan}` to take it again"
    elif stem in MAP_NAMES:
        again = f"the {stem} map is damaged; run `waferscope inspect {scan}` to write it again"
    else:
        again = f"the mosaic is damaged; run `waferscope stitch {scan}` to fuse it again"
    return f"{chunk}: a compressed chunk cannot be decoded ({first_line(error)}); {again}"


def damaged_output(folder: Path) -> str | None:
    """What is damaged among the images a scan's stages wrote (the mosaic, the inspection's
    maps): the one line a reader of it would refuse with (a level or chunk missing, metadata
    unreadable, a chunk that does not decode), or None when they are whole.

    ``resume`` asks it of a complete scan: the damage is redone from the intact raw tiles
    (stitched, inspected and reported again) rather than refused as "nothing to resume".
    """
    from scanner.ngff import check_complete, open_mosaic

    folder = Path(folder)
    if not (folder / MOSAIC).exists():  # `inspect` sends to `stitch` or `resume`
        return f"{folder / MOSAIC} is missing"
    images = [p for p in (folder / MOSAIC, *(folder / n for n in MAP_NAMES.values()))
              if p.exists()]
    for image in images:
        try:
            levels, _ = open_mosaic(image)
            for k, level in enumerate(levels):
                check_complete(level, f"{image} level {k}")
        except (UserError, ValueError) as exc:  # its advice is what resume does now
            return re.sub(r" \(re-run `waferscope \w+`\)", "", str(exc))
    found = find_undecodable_chunk(images)
    if found is not None:
        _, chunk, exc = found
        return f"{chunk}: a compressed chunk cannot be decoded ({first_line(exc)})"
    return None
