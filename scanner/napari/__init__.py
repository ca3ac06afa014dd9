"""napari review of a scan folder (an npe2 plugin; manifest ``napari.yaml`` beside this file).

The reader (:mod:`scanner.napari._reader`) imports napari nothing, so it works and is tested
without napari or a display; :mod:`scanner.napari.viewer` opens a viewer (``waferscope view``).
Install with ``pip install 'waferscope[napari]'``.
"""
