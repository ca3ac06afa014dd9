"""The scan folder: the interface between the stages of the flow.

``scan.json`` describes the scan (resolved recipe, versions, plan, per-stage timings, status);
each stage reads what the previous one wrote, so stages can be re-run alone.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from scanner.errors import UserError
from scanner.scanrecord import RUNNING, validated_scan
from simulators.errors import first_line

SCAN_JSON = "scan.json"
TRUTH_JSON = "truth.json"
#: the tile journal (written by ``scanner.tilestore``)
TILES_CSV = "tiles.csv"
#: the stitched OME-NGFF mosaic (written by ``scanner.stitching.stitch``)
MOSAIC = "mosaic.ome.zarr"
#: the lock a process holds on a scan folder while it works on it (see :func:`hold`)
LOCK = ".waferscope.lock"
#: every name a scan writes into its folder (each stage's own constant; tests/test_resume.py
#: checks that they are all here): what `run --overwrite` replaces. Anything else in the
#: folder (the user's recipe or notes kept beside the scan) is carried into the new scan
SCAN_OUTPUTS = frozenset({
    "scan.json", "truth.json", "tiles.csv", "tiles.zarr", "mosaic.ome.zarr", "flatfield.npy",
    "alignment.png", "alignment_refused.png", "focus_map.json", "focus_map.png", "anomaly.ome.zarr",
    "roughness.ome.zarr", "uncertainty.ome.zarr", "defects.json", "defects.csv",
    "defects.klarf", "wafermap.png", "repeaters.json", "scores.csv", LOCK,
})


_PACKAGES = ("waferscope", "pymmcore-plus", "pymmcore", "useq-schema", "zarr", "numpy",
             "scikit-image", "scipy", "pydantic", "torch")


def now_iso() -> str:
    """Local time with offset, to the second."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def software_versions() -> dict[str, str]:
    """Versions of Python and the packages that shape a scan's results."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a crash leaves the previous file intact)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_scan_json(folder: Path) -> dict[str, Any]:
    """Read ``scan.json`` of a scan folder.

    Raises
    ------
    UserError
        If the folder or file is missing or unreadable, or the record does not fit
        :class:`scanner.scanrecord.ScanRecord` (the field is named).
    """
    path = Path(folder) / SCAN_JSON
    if not Path(folder).exists():  # a path typed wrong is no folder at all
        raise UserError(f"{folder}: no such folder")
    if not path.is_file():
        raise UserError(f"{folder}: not a scan folder (no {SCAN_JSON})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSON and UTF-8 decoding errors are ValueErrors
        raise UserError(f"{path}: unreadable ({first_line(exc)})") from None
    return validated_scan(data, str(path))


def scan_json_if_any(folder: Path) -> dict[str, Any] | None:
    """The ``scan.json`` beside a mosaic, None when there is none or it is unreadable (what
    only refines a stage: a bare mosaic is inspected whole, with the pooled threshold)."""
    if not (Path(folder) / SCAN_JSON).is_file():
        return None
    try:
        return read_scan_json(folder)
    except UserError:
        return None


def planned_grid(folder: Path) -> tuple[Any, Any]:
    """The plan's rows and columns from a scan folder's ``scan.json`` (each None when it
    records none)."""
    plan = (scan_json_if_any(folder) or {}).get("plan") or {}
    return plan.get("n_rows"), plan.get("n_cols")


def file_in_the_way(path: Path, itself: bool = False) -> Path | None:
    """The file that stops ``path`` being made as a folder or in one: its nearest existing
    folder above it (or ``path`` itself with ``itself``), when that is a file; else None."""
    path = Path(path)
    nearest = next((p for p in ((path,) if itself else ()) + tuple(path.parents)
                    if p.exists()), None)
    return nearest if nearest is not None and not nearest.is_dir() else None


def prepare_folder(out: Path | None, root: Path, name: str, overwrite: bool = False
                   ) -> tuple[Path, Path | None]:
    """Choose and create the scan folder without destroying an earlier scan: the folder, and
    where an earlier scan it replaces was set aside (None: none).

    An earlier scan replaced (``overwrite``) is moved aside, not deleted: the new scan can
    still be refused (a wafer not found where the recipe puts it) before its first tile, and
    :func:`put_back` then restores it; :func:`discard` deletes it once the new scan started.

    Parameters
    ----------
    out : Path or None
        Folder the user asked for; None picks ``root/name-YYYYmmdd-HHMMSS``.
    root : Path
        Parent folder for automatically named scans.
    name : str
        Scan name.
    overwrite : bool
        Allow replacing an existing scan folder given as ``out``.

    Raises
    ------
    UserError
        If ``out`` exists, is not empty, and ``overwrite`` is False.
    """
    if out is None:
        root = Path(root)
        blocked = file_in_the_way(root, itself=True)
        if blocked is not None:
            raise UserError(f"output.root {root}: {blocked} is a file, not a folder")
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path(root) / f"{name}-{stamp}"
        suffix = 1
        while out.exists():
            out = Path(root) / f"{name}-{stamp}-{suffix}"
            suffix += 1
    out = Path(out)
    if out.is_symlink():  # the folder it points to holds the scan; the link stays a link
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    above = file_in_the_way(out)
    if above is not None:
        raise UserError(f"--out {out}: {above} is a file, not a folder")
    if set_aside_path(out).is_dir() and not _took_a_tile(out):
        # a replacing run stopped before its first tile (killed while it aligned, or right
        # after it took the folder): the scan it set aside comes back, as it would have had
        # the run been refused or interrupted there
        _not_running(out)
        put_back(out, set_aside_path(out))
    if out.is_dir() and _holds_anything(out):
        if not overwrite:
            raise UserError(
                f"--out {out}: folder is not empty; choose another folder or pass --overwrite"
            )
        if not (out / SCAN_JSON).is_file():
            raise UserError(f"--out {out}: not a scan folder; refusing to overwrite it")
        _not_running(out)
        _not_the_working_folder(out)
        aside = set_aside_path(out)
        if aside.exists():  # left by a replacing run that was killed: that scan had started
            discard(aside, out)
        with hold(out):  # no other process starts on it while it is moved
            out.rename(aside)
        out.mkdir()
        return out, aside
    out.mkdir(parents=True, exist_ok=True)
    return out, None


def _not_running(folder: Path) -> None:
    """Refuse a scan folder whose scan another process is still working on."""
    scan = scan_json_if_any(folder) if folder.is_dir() else None
    status = running_status(folder, scan) if scan is not None else None
    if status in RUNNING:
        raise UserError(f"--out {folder}: the scan there is still {status} (process "
                        f"{(scan or {}).get('process', {}).get('pid')} is alive); wait "
                        "for it or choose another folder")


def _not_the_working_folder(folder: Path) -> None:
    """Refuse to replace the scan folder this command runs in (``run --out . --overwrite``
    inside it): it failed with "OSError: [Errno 16] Device or resource busy" given as ``.``,
    and moved aside and deleted under the shell's feet given by name (a shell left in a
    deleted folder, where the next command cannot even tell where it is)."""
    try:
        here = Path.cwd().resolve()
    except OSError:  # the working folder itself is gone: it is not this one
        return
    there = Path(folder).resolve()
    if here == there or there in here.parents:
        raise UserError(f"--out {folder}: the working folder is inside it; run from "
                        "outside the scan folder to replace it (cd ..)")


def _took_a_tile(folder: Path) -> bool:
    """Whether the scan in ``folder`` has an ``ok`` row in its tile journal (it stored a
    tile: the scan it replaced was discarded then); rows of lost tiles alone acquired
    nothing."""
    try:
        with open(folder / TILES_CSV, encoding="utf-8", errors="replace") as journal:
            return any(row.get("status") == "ok" for row in csv.DictReader(journal))
    except OSError:  # no folder, no journal
        return False


def _holds_anything(folder: Path) -> bool:
    """Whether a folder holds more than a lock file (a run stopped right after it took the
    folder leaves only that)."""
    return any(entry.name != LOCK for entry in folder.iterdir())


def set_aside_path(folder: Path) -> Path:
    """Where :func:`prepare_folder` sets aside the earlier scan in ``folder`` that a new one
    replaces (one fixed name, so that a run killed before it could discard it leaves nothing
    that the next run or ``resume`` does not clear)."""
    # normalised first: a scan folder given as "." or "sub/.." has no name of its own
    folder = Path(os.path.abspath(folder))
    return folder.with_name(f".{folder.name}.replaced")


def put_back(folder: Path, aside: Path | None) -> None:
    """Restore the earlier scan :func:`prepare_folder` set aside, replacing ``folder``."""
    if aside is None or not aside.is_dir():
        return
    shutil.rmtree(folder, ignore_errors=True)
    aside.rename(folder)


def discard(aside: Path | None, folder: Path) -> None:
    """Delete the earlier scan :func:`prepare_folder` set aside (the new one in ``folder`` has
    started); what it held that no scan writes (:data:`SCAN_OUTPUTS`; a recipe, notes) is
    moved into ``folder`` first, not deleted with it."""
    if aside is None:
        return
    for entry in sorted(aside.iterdir()) if aside.is_dir() else []:
        if entry.name not in SCAN_OUTPUTS and ".tmp" not in entry.name \
                and not (folder / entry.name).exists():
            entry.rename(folder / entry.name)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def hold(folder: Path, *, write: bool = True) -> Iterator[bool]:
    """Keep other waferscope processes off a scan folder while this one works on it.

    Two commands at once on one scan (``batch`` and ``inspect``, ``resume`` and ``stitch``)
    would write the same temporary stores and maps under each other. The lock is the operating
    system's (``flock``, through :mod:`filelock`) on a file in the folder, so a process that
    dies, ``kill -9`` included, leaves no stale lock behind.

    Parameters
    ----------
    folder : Path
        Scan folder.
    write : bool
        The process writes into the folder. A folder where the lock cannot be made (read-only)
        is then refused; a process that only reads it goes on without the lock.

    Yields
    ------
    bool
        Whether this process holds the lock (False: a read-only folder, ``write`` False).

    Raises
    ------
    UserError
        If another process holds the folder, or (``write``) the lock cannot be made there.
    """
    lock = FileLock(Path(folder) / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"{folder}: another waferscope process is working on this scan; "
                        "wait for it") from None
    except OSError as exc:
        if write:
            raise UserError(f"{folder}: cannot write in the scan folder "
                            f"({first_line(exc)})") from None
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def held_elsewhere(folder: Path) -> bool | None:
    """Whether another process holds ``folder`` (:func:`hold`); None when it cannot be told
    (no lock can be made there: a read-only folder).

    Every process that records a running stage in ``scan.json`` holds the folder while it
    runs, so a free lock means the recorded process is gone, whatever its process id now
    names: after a reboot the id may belong to another program, and a process recorded by
    another computer sharing the folder cannot be asked at all.
    """
    lock = FileLock(Path(folder) / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    except OSError:
        return None
    lock.release()
    return False


def this_process() -> dict[str, Any]:
    """What ``scan.json`` records of the process running a stage (to tell a crash later)."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _alive(process: dict[str, Any] | None) -> bool:
    if not process:
        return False
    if process.get("host") != socket.gethostname():
        return True  # another machine's process cannot be checked from here
    pid = int(process.get("pid", 0))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped) is not running the scan
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def effective_status(scan: dict[str, Any], *, others_hold: bool | None = None) -> str:
    """The scan's status, with a running stage whose process is gone read as ``interrupted``.

    A ``kill -9`` leaves ``scan.json`` at the stage that was running; nothing else can fix it.
    ``others_hold``: whether another process holds the scan folder (:func:`held_elsewhere`;
    False too when the caller holds it). False: a running stage is over; None (not known):
    the recorded process is looked for on this computer, and one of another computer is
    taken to be alive.
    """
    status = str(scan.get("status", "unknown"))
    if status in RUNNING and (others_hold is False
                              or (others_hold is None and not _alive(scan.get("process")))):
        return "interrupted"
    return status


def running_status(folder: Path, scan: dict[str, Any], *, held_here: bool = False) -> str:
    """:func:`effective_status` of the scan in ``folder``, its lock asked only when the record
    shows a running stage (``held_here``: this process holds the folder)."""
    recorded = str(scan.get("status", "unknown"))
    others = False if held_here else held_elsewhere(folder) if recorded in RUNNING else None
    return effective_status(scan, others_hold=others)
