"""The detector's windows reuse the heap (models.heap): large blocks stay in the process
inside the scope, and glibc's own limits are back outside it."""

import ctypes
from pathlib import Path

import numpy as np
import pytest

from models import heap

pytestmark = pytest.mark.skipif(heap._LIBC is None or not hasattr(heap._LIBC, "mallinfo2"),
                                reason="glibc only")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mmapped_bytes() -> int:
    heap._LIBC.mallinfo2.restype = _MallInfo2
    return int(heap._LIBC.mallinfo2().hblkhd)


def _mmapped_while_holding(n_bytes: int) -> int:
    """Bytes glibc holds in mmapped blocks while an array of ``n_bytes`` is alive."""
    before = _mmapped_bytes()
    a = np.ones(n_bytes, np.uint8)
    held = _mmapped_bytes() - before
    del a
    return held


def test_large_blocks_come_from_the_heap_inside_and_from_mmap_outside():
    # in a fresh interpreter: glibc moves a thread whose heap once could not grow (a mapping
    # above it) to another arena for good, and there a block over 64 MiB is always mmapped;
    # late in a long test session the main thread had moved, and the block came from mmap
    import subprocess
    import sys

    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_heap import _mmapped_while_holding
from models import heap
size = 96 << 20  # over glibc's largest mmap threshold (32 MiB)
assert _mmapped_while_holding(size) >= size
with heap.reused_heap():
    assert _mmapped_while_holding(size) == 0
    with heap.reused_heap():  # nested scopes (a window inside a mosaic's maps)
        assert _mmapped_while_holding(size) == 0
    assert _mmapped_while_holding(size) == 0  # the inner exit did not restore
assert _mmapped_while_holding(size) >= size
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_scope_ends_on_an_error():
    with pytest.raises(RuntimeError), heap.reused_heap():
        raise RuntimeError("a window failed")
    assert heap._depth == 0
    assert _mmapped_while_holding(96 << 20) >= 96 << 20


class _Spy:
    """A model whose windows record whether they ran inside the reused heap."""

    def __init__(self, model):
        self._model, self.depths = model, []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def predict(self, batch, margin=0):
        self.depths.append(heap._depth)
        return self._model.predict(batch, margin=margin)


def test_a_mosaics_windows_run_in_the_reused_heap(tmp_path):
    import torch
    from scipy import ndimage

    from models import InspectionModel
    from models.network import InspectionNet
    from scanner.inspection.maps import infer_mosaic
    from scanner.ngff import build_pyramid, create_multiscale, finish_multiscale

    torch.manual_seed(0)
    spy = _Spy(InspectionModel(InspectionNet(), {"pixel_size_um": 1.0, "threshold": 0.5}))
    img = (ndimage.gaussian_filter(np.random.default_rng(0).random((500, 600)), 2.0) * 3000
           + 1000).astype(np.uint16)
    mosaic = tmp_path / "mosaic.ome.zarr"
    tmp, arrays = create_multiscale(mosaic, img.shape, chunk=128, dtype=img.dtype)
    arrays[0][:] = img
    build_pyramid(arrays, 128)
    finish_multiscale(tmp, mosaic, len(arrays), 1.0, (0.0, 0.0), "mosaic")
    infer_mosaic(spy, mosaic, tmp_path / "maps", core_px=192)
    assert len(spy.depths) > 1 and min(spy.depths) >= 1
    assert heap._depth == 0
