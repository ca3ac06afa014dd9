"""One thread for numpy's BLAS while many small matrix products run.

numpy's wheels bring their own OpenBLAS, which splits every product over all cores. The
products of inspection are tiny (scikit-image's phase correlation refines each die block's
shift by an upsampled DFT: two complex products of 30 x 128 by 128 x 128), and waking the
second thread for each costs more than the product: one correlation of a 128 px block took
1.4 ms on one thread and 25-50 ms on two on a busy 2-core machine (the main thread waits
for a worker the scheduler has not run yet), 0.8 ms against 1.9 ms idle. The results are the
same: each element of a product is computed by the same kernel over the same sum, whichever
thread computes it.

:func:`single_blas_thread` sets numpy's BLAS (found and set by ``threadpoolctl``) to one
thread for the duration and restores it on leaving; scipy's and torch's own libraries are left
as they are (the network's convolutions want every core).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_lock = threading.Lock()
_depth = 0
_limiter: Any = None


def numpy_blas() -> Any:
    """A ``threadpoolctl`` controller of numpy's own BLAS libraries (none where numpy uses
    another BLAS than one ``threadpoolctl`` knows)."""
    import numpy as np  # noqa: F401 - loads numpy's BLAS, if it is not loaded yet
    from threadpoolctl import ThreadpoolController

    controller = ThreadpoolController()
    paths = [lib.filepath for lib in controller.lib_controllers
             if lib.user_api == "blas" and "numpy" in lib.filepath]
    return controller.select(filepath=paths)


@contextmanager
def single_blas_thread() -> Iterator[None]:
    """numpy's BLAS on one thread while inside (re-entrant, any thread); its thread count
    restored on leaving the outermost one."""
    global _depth, _limiter
    with _lock:
        _depth += 1
        if _depth == 1:
            _limiter = numpy_blas().limit(limits=1)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _limiter is not None:
                _limiter.restore_original_limits()
                _limiter = None
