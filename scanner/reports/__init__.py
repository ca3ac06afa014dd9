"""Reports: locate the defects of a scan and write what a fab uses.

``defects.json`` / ``defects.csv`` (located rows and header), ``defects.klarf`` (KLARF 1.2,
wafers) and ``wafermap.png``. :func:`report` is the pipeline stage; the napari review lives in
:mod:`scanner.napari`.
"""

from scanner.reports.report import ReportResult, report

__all__ = ["ReportResult", "report"]
