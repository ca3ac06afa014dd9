"""Values that must agree where a module cannot import the one that owns them.

``scanner.scanfolder.MOSAIC`` names the mosaic (the modules below import it; the test keeps
them from spelling it again). ``models`` may not import ``scanner`` (tests/test_layers.py), so the
merge gap of ``scanner.inspection.defects`` is restated on the map grid in ``models.thresholds``.
"""

from __future__ import annotations


def test_the_mosaic_has_one_name() -> None:
    import scanner.inspection.goodimages
    import scanner.inspection.inspect
    import scanner.integrity
    import scanner.napari._reader
    import scanner.stitching.stitch
    from scanner.scanfolder import MOSAIC

    assert MOSAIC == "mosaic.ome.zarr"
    for module in (scanner.stitching.stitch, scanner.inspection.inspect, scanner.integrity,
                   scanner.inspection.goodimages, scanner.napari._reader):
        assert module.MOSAIC == MOSAIC, module.__name__


def test_calibration_merges_defects_as_inspection_does() -> None:
    import inspect

    from models.detector import OUTPUT_STRIDE
    from models.thresholds import DEFECT_MERGE_MAP_PX
    from scanner.inspection.defects import MERGE_PX, extract_defects

    assert inspect.signature(extract_defects).parameters["merge_px"].default == MERGE_PX
    assert DEFECT_MERGE_MAP_PX == MERGE_PX / OUTPUT_STRIDE
