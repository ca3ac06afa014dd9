"""``waferscope batch``: stitch, inspect and report many scan folders, on a dask cluster.

Scans are taken one after the other; inside each, fusion and inspection are spread over the
cluster's workers as tasks (:mod:`scanner.cluster`), so that one large wafer uses every
worker as well as many small ones do. A scan that fails is recorded and the batch goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from scanner.errors import UserError, undecodable

if TYPE_CHECKING:
    from scanner.inspection.card import ModelRef
    from scanner.inspection.tiled import Model

__all__ = ["BatchItem", "run_batch"]

log = logging.getLogger("waferscope.batch")


class BatchItem(BaseModel):
    """How one scan folder of a batch went."""

    folder: Path
    ok: bool
    n_defects: int | None = None
    wall_s: float = 0.0
    error: str | None = None
    bad_input: bool = Field(False, description="the failure is the folder's (not a scan, "
                            "damaged or incomplete data): the user can act on it")


def process_scan(folder: Path, *, model: Model, cluster: Any = None,
                 events: Any = None, allow_incomplete: bool = False) -> int:
    """Stitch, inspect and report one scan folder; returns its number of defects.

    Raises
    ------
    UserError
        The folder is not a scan that can be stitched (see
        :func:`scanner.integrity.require_ready`).
    """
    from scanner.integrity import claim
    from scanner.pipeline import _report_stage, inspect_stage, restitch
    from scanner.scanfolder import read_scan_json

    if not Path(folder).exists():
        raise UserError(f"{folder}: no such folder")
    with claim(folder, "batch", allow_incomplete=allow_incomplete) as working:
        restitch(folder, events=events, cluster=cluster)
        working("inspecting")
        scan = read_scan_json(folder)
        result = inspect_stage(folder, scan, model=model, events=events, cluster=cluster)
        working("reporting")
        if events is not None:
            _report_stage(folder, events)
        else:
            from scanner.reports import report

            report(folder)
    return int(result.n_defects)


def run_batch(folders: Sequence[Path], *, model: ModelRef = None, cluster: Any = None,
              events: Any = None, allow_incomplete: bool = False,
              on_item: Callable[[BatchItem], None] | None = None) -> list[BatchItem]:
    """:func:`process_scan` on each folder in turn; a failure is recorded, not raised, and
    ``on_item`` hears of each folder as it ends."""
    from scanner.inspection.inspect import load_inspection_model

    model = load_inspection_model(model)  # once, not once per scan
    items = []
    seen: set[Path] = set()
    for folder in folders:
        if Path(folder).resolve() in seen:  # one folder named twice (`A A/`): done once
            continue
        seen.add(Path(folder).resolve())
        t0 = time.perf_counter()
        try:
            n = process_scan(Path(folder), model=model, cluster=cluster, events=events,
                             allow_incomplete=allow_incomplete)
            items.append(BatchItem(folder=Path(folder), ok=True, n_defects=n,
                                   wall_s=round(time.perf_counter() - t0, 3)))
        except Exception as exc:
            # damaged stored data is that folder's, as bad input is: recorded, and the batch
            # goes on to the next scan. Anything else (a fault of this program, a cluster
            # lost) is recorded as a failure too, named by its type, so that the scans done
            # before it are still reported; WAFERSCOPE_DEBUG=1 shows its traceback
            damaged = undecodable(exc)
            known = damaged or isinstance(exc, (UserError, OSError, ValueError))
            if not known:
                log.debug("batch: %s failed", folder, exc_info=True)
            if damaged:
                from scanner.integrity import damaged_data_message

                error = damaged_data_message(exc, str(folder))  # names the chunk's file
            else:
                error = str(exc) if known else f"{type(exc).__name__}: {exc}"
            items.append(BatchItem(folder=Path(folder), ok=False, error=error,
                                   wall_s=round(time.perf_counter() - t0, 3),
                                   bad_input=damaged or isinstance(exc, UserError)))
        if on_item is not None:
            on_item(items[-1])
    return items
