"""What a stage may be run on: refuse scans that are unfinished or damaged.

``stitch``, ``inspect`` and ``report`` run on a scan folder only when what they read is whole:
every planned tile acquired (unless the user accepts an incomplete scan) and every journaled
tile's data in the store. A damaged store is refused whatever the options: a missing chunk
would otherwise be read as a black tile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from devices.spec import MISSING_FILE
from scanner.defectlist import DEFECTS_JSON
from scanner.errors import UserError
from scanner.recipe import RecipeError, parse_recipe
from scanner.scanfolder import MOSAIC, RUNNING, SCAN_JSON, effective_status, read_scan_json
from scanner.tilestore import check_journal

#: the stage a command reads from, by command
_NEEDS = {"stitch": "acquire", "inspect": "stitch", "report": "inspect"}
_OUTPUT = {"stitch": MOSAIC, "inspect": DEFECTS_JSON}


def require_ready(folder: Path, command: str, *, allow_incomplete: bool = False
                  ) -> dict[str, Any]:
    """Check that a scan folder can be given to ``command``; return its ``scan.json``.

    Parameters
    ----------
    folder : Path
        Scan folder.
    command : {"stitch", "inspect", "report"}
        What is about to run.
    allow_incomplete : bool
        Accept a scan whose acquisition did not take every planned tile
        (``--allow-incomplete``); damage is refused all the same.

    Raises
    ------
    UserError
        One line naming the scan's status, the missing tiles or the damaged tile.
    """
    folder = Path(folder)
    scan = read_scan_json(folder)
    check_recorded_recipe(folder, scan)
    status = effective_status(scan)
    if status in RUNNING:  # its outputs are being written: they would change underneath
        raise UserError(f"{folder}: the scan is still {status} (process "
                        f"{(scan.get('process') or {}).get('pid')} is alive); wait for it")
    # the mosaic and the defect list are written whole or not at all (renamed into place)
    needed = _NEEDS[command]
    if needed != "acquire" and not (folder / _OUTPUT[needed]).exists():
        if needed == "inspect" and not (scan.get("options") or {}).get("inspect", True):
            # run with --no-inspect: resume has nothing to finish ("complete")
            raise UserError(f"{folder}: scan {status}: no {_OUTPUT[needed]} (it was run "
                            "with --no-inspect); run `waferscope inspect` on it")
        raise UserError(f"{folder}: scan {status}: no {_OUTPUT[needed]} (its {needed} stage "
                        f"did not finish); run `waferscope {needed}` or `waferscope resume`")
    n_planned = planned_tiles(folder, scan)
    records = check_journal(folder, n_planned)
    ok = {r.index for r in records if r.status == "ok"}
    hint = "run `waferscope resume` on it, or pass --allow-incomplete"
    if len(ok) < n_planned and not allow_incomplete:
        missing = sorted(set(range(n_planned)) - ok)
        raise UserError(f"{folder}: scan {status}: {len(ok)} of {n_planned} planned tiles "
                        f"acquired (first missing: tile {missing[0]}); {hint}")
    return scan


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
