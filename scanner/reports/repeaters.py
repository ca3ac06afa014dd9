"""Repeater analysis: defects at the same position inside most dies of a wafer.

A defect found at the same in-die position in most dies is systematic, not random: a
structure of the die design that the inspection model takes for a defect, or a reticle defect
printed into every die. Fab inspection reports such *repeaters* apart from random defects,
and so does this module. They go to ``repeaters.json``, grouped by in-die position with the
dies they occur in. They are left out of the random defect list, the KLARF file and the die
yield.

The grouping links in-die positions closer than a tolerance (scipy's KD-tree pairs), takes
connected groups (``scipy.sparse.csgraph``), and keeps a group when it covers at least
``min_fraction`` of the full dies tested and at least ``min_dies`` dies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scanner.defectlist import Defect
from scanner.scanfolder import write_json

REPEATERS_JSON = "repeaters.json"


@dataclass
class RepeaterGroup:
    """Defects at one in-die position.

    Attributes
    ----------
    die_x_um, die_y_um : float
        Mean position inside the die.
    dies : list of (int, int)
        Die (column, row) of every member.
    defects : list of Defect
        The members.
    """

    die_x_um: float
    die_y_um: float
    dies: list[tuple[int, int]]
    defects: list[Defect]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"die_x_um": round(self.die_x_um, 3), "die_y_um": round(self.die_y_um, 3),
                "n_dies": len(set(self.dies)), "dies": [list(d) for d in sorted(set(self.dies))],
                "defects": [d.to_dict() for d in self.defects]}


def find_repeaters(
    defects: list[Defect],
    n_full_dies: int,
    tolerance_um: float,
    min_fraction: float = 0.5,
    min_dies: int = 3,
) -> tuple[list[Defect], list[RepeaterGroup]]:
    """Split located defects into random defects and repeater groups.

    Parameters
    ----------
    defects : list of Defect
        Defects with die fields filled (:func:`scanner.reports.locate.locate`); others are
        always random.
    n_full_dies : int
        Full dies tested (the base of ``min_fraction``).
    tolerance_um : float
        In-die positions closer than this are the same position.
    min_fraction, min_dies :
        A group is a repeater when its defects lie in at least ``max(min_dies,
        min_fraction * n_full_dies)`` distinct dies.

    Returns
    -------
    random : list of Defect
        Defects that are not repeaters (input order).
    groups : list of RepeaterGroup
        Repeater groups, ordered by in-die position.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    located = [i for i, d in enumerate(defects) if d.die_x_um is not None
               and d.die_y_um is not None and d.die_col is not None and d.die_row is not None]
    need = max(min_dies, int(np.ceil(min_fraction * n_full_dies)))
    if len(located) < need or n_full_dies < min_dies:
        return list(defects), []
    xy = np.array([[defects[i].die_x_um, defects[i].die_y_um] for i in located], dtype=float)
    pairs = cKDTree(xy).query_pairs(r=float(tolerance_um), output_type="ndarray")
    n = len(located)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    repeater_ids: set[int] = set()
    groups = []
    for lab in np.unique(labels):
        members = [located[k] for k in np.flatnonzero(labels == lab)]
        dies = [(defects[i].die_col, defects[i].die_row) for i in members]
        if len(set(dies)) >= need:
            repeater_ids.update(members)
            mx, my = xy[labels == lab].mean(axis=0)
            groups.append(RepeaterGroup(float(mx), float(my), dies,  # type: ignore[arg-type]
                                        [defects[i] for i in members]))
    groups.sort(key=lambda g: (g.die_y_um, g.die_x_um))
    random = [d for i, d in enumerate(defects) if i not in repeater_ids]
    return random, groups


def read_repeaters(folder: Path, source_created: Any) -> list[Defect]:
    """Defects of an earlier repeater analysis of the same inspection (else none).

    The report stage is re-run on its own output: defects it moved to ``repeaters.json`` must
    come back into the analysis, but only while ``defects.json`` still comes from the same
    inspection run (its header's ``created``).
    """
    path = Path(folder) / REPEATERS_JSON
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("source_created") != source_created:
            return []
        return [Defect.from_dict(d) for g in data.get("groups", []) for d in g["defects"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def write_repeaters(folder: Path, groups: list[RepeaterGroup], source_created: Any,
                    tolerance_um: float) -> Path:
    """Write ``repeaters.json`` atomically."""
    path = Path(folder) / REPEATERS_JSON
    write_json(path, {"source_created": source_created, "tolerance_um": round(tolerance_um, 3),
                      "n_groups": len(groups),
                      "n_defects": sum(len(g.defects) for g in groups),
                      "groups": [g.to_dict() for g in groups]})
    return path
