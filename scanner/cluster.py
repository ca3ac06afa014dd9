"""Scale-out on dask.distributed: ``--dask ADDRESS`` or ``--dask local:N``.

Fusion and inspection are cut into tasks over the Zarr stores, which every worker opens by
path (a ``zarr.Array`` pickles as its path): fusion into blocks of chunks of level 0
(:func:`scanner.stitching.mosaic.fuse_block`), then each pyramid level into chunk rows; inspection
into groups of windows whose maps go to a scratch store, then chunk rows of the maps blended
from them (:mod:`scanner.inspection.streammaps`), each blend waiting only for its three window rows.
The same chunks are computed by the same code, only elsewhere: the mosaic is that of the
path without dask bit for bit, and so are the maps when a worker runs torch on as many threads
as the path without dask does; torch's float sums depend on its thread count, so on another
count the maps agree to float32 rounding (about 1e-7 relative) and the defect list is the same,
its scores to that rounding.

A worker loads the model itself, once, from its file (a torch module is never pickled), and
runs torch on ``WAFERSCOPE_TORCH_THREADS`` threads when set, else on its own cores. A
``local:N`` cluster is N worker processes of one core each (one task at a time, torch on one
thread), the unit a cluster scales by: ``local:N`` with N the machine's cores uses all of it,
and ``local:2`` against ``local:1`` measures what a second worker adds. Dask's nanny starts
its workers with ``OMP_NUM_THREADS=1`` for the same reason: parallelism comes from workers,
not from threads inside a task.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from scanner.errors import UserError

if TYPE_CHECKING:
    from scanner.inspection.tiled import Model

__all__ = ["Cluster", "ClusterSpec", "open_cluster", "worker_threads"]

#: Environment variable that sets torch's threads in a worker.
THREADS_ENV = "WAFERSCOPE_TORCH_THREADS"
#: Windows per inspection task: enough to hide a task's overhead (~10 ms) behind seconds of
#: network time, few enough that two workers share a mosaic of a few window rows evenly.
WINDOWS_PER_TASK = 2

_LOCAL = re.compile(r"^local:(\d+)$")
_ADDRESS = re.compile(r"^(?:(?:tcp|tls|inproc|ucx|ws|wss)://)?[\w.\-\[\]:]+:\d+$")


class ClusterSpec(BaseModel):
    """Where dask tasks run: a new local cluster of ``local_workers`` processes, or an existing
    scheduler at ``address``."""

    model_config = ConfigDict(frozen=True)

    address: str | None = None
    local_workers: int | None = Field(default=None, ge=1, le=256)

    @classmethod
    def parse(cls, text: str) -> ClusterSpec:
        """``local:N`` or a scheduler address (``tcp://host:8786``, ``host:8786``).

        Raises
        ------
        UserError
            Anything else.
        """
        text = text.strip()
        m = _LOCAL.match(text)
        if m:
            n = int(m.group(1))
            # a worker is one core: more workers than cores only share them, and dozens of
            # processes starting at once on a small machine time out before they serve
            if not 1 <= n <= _cores():
                raise UserError(f"--dask {text}: local:N needs 1 <= N <= {_cores()} (this "
                                "machine's cores; each worker is one core)")
            return cls(local_workers=n)
        if _ADDRESS.match(text):
            if not 0 < int(text.rsplit(":", 1)[1]) <= 65535:
                raise UserError(f"--dask {text}: a port is a number from 1 to 65535")
            return cls(address=text)
        raise UserError(f"--dask {text}: expected local:N (N worker processes here) or the "
                        "address of a dask scheduler (tcp://HOST:PORT)")


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def open_cluster(spec: str | ClusterSpec) -> Iterator[Cluster]:
    """Connect to (or start) the cluster of ``spec``; closed (or left running) at the end."""
    from distributed import Client, LocalCluster

    spec = ClusterSpec.parse(spec) if isinstance(spec, str) else spec
    if spec.local_workers is not None:
        n = spec.local_workers
        # one core per worker process (module docstring), one task at a time: two windows at
        # once would double a worker's memory
        env = {THREADS_ENV: "1", "OMP_NUM_THREADS": "1"}
        # the workers leave Ctrl-C to this process (dask_setup below)
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          dashboard_address=None, env=env, memory_limit=0,
                          preload=[__name__]) as local, \
                Client(local) as client:
            yield Cluster(client)
        return
    _check_scheduler(spec.address)
    try:
        client = Client(spec.address, timeout="20s")
    except OSError as exc:
        raise UserError(f"--dask {spec.address}: no dask scheduler there ({exc})") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=WORKERS_WAIT_S)
        except TimeoutError:
            # tasks would wait for ever (a scheduler whose workers are gone or not started)
            raise UserError(f"--dask {spec.address}: the scheduler has no workers (none "
                            f"joined in {WORKERS_WAIT_S:g} s); start some with `dask worker "
                            f"{spec.address}`") from None
        yield Cluster(client)


def dask_setup(worker: Any) -> None:
    """A ``local:N`` worker's preload: Ctrl-C is left to the process that started it.

    A terminal sends Ctrl-C to the whole process group: each worker died of it, printing
    dask's KeyboardInterrupt traceback around waferscope's one line, while that process
    stops the workers itself as the scan is left interrupted.
    """
    if threading.current_thread() is threading.main_thread():  # a worker process's own
        signal.signal(signal.SIGINT, signal.SIG_IGN)


#: how long a scheduler is given to answer dask's handshake, and to have a worker
HANDSHAKE_S = 20.0
#: how long its host is given to accept a TCP connection: a scheduler on the network
#: accepts in milliseconds; an address where no host answers (a firewall that drops, a host
#: that is off) otherwise held the command for the whole handshake
CONNECT_S = 5.0
WORKERS_WAIT_S = 30.0


def _check_scheduler(address: str) -> None:
    """Refuse an address where no dask scheduler answers its handshake in
    :data:`HANDSHAKE_S`: a server of another protocol there (a web server) accepted the
    connection and the client waited for its answer for ever."""
    import asyncio

    from distributed.comm import connect

    _check_listening(address)

    async def handshake() -> None:
        comm = await asyncio.wait_for(connect(address, timeout=f"{HANDSHAKE_S:g}s"),
                                      HANDSHAKE_S + 5)
        await comm.close()

    try:
        asyncio.run(handshake())
    except (OSError, ValueError) as exc:  # TimeoutError is an OSError
        why = "no answer" if isinstance(exc, TimeoutError) else str(exc) or type(
            exc).__name__
        raise UserError(f"--dask {address}: no dask scheduler there ({why})") from None
    except Exception as exc:  # noqa: BLE001 - whatever answered, it is no dask scheduler
        # a web server there (the dashboard's port, 8787, given for the scheduler's) sent
        # "HTTP/1.1 400...", read by dask as a frame of 3 EiB: MemoryError, exit 1
        raise UserError(f"--dask {address}: no dask scheduler there (what answers does not "
                        f"speak dask's protocol: {type(exc).__name__})") from None


def _check_listening(address: str) -> None:
    """Refuse at once a TCP address where nothing listens: dask's connect retries a refused
    connection until its timeout (``--dask tcp://127.0.0.1:1`` took 20 s to say so)."""
    import socket

    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        if scheme != "tcp":
            return  # tls, ucx, ...: dask's own connect says why
        host, port = parse_host_port(location)
    except ValueError:
        return
    try:
        with socket.create_connection((host, port), timeout=CONNECT_S):
            pass
    except TimeoutError:
        raise UserError(f"--dask {address}: no dask scheduler there (no host accepted the "
                        f"connection in {CONNECT_S:g} s: is the address right and the "
                        "scheduler's host on?)") from None
    except ConnectionRefusedError:
        raise UserError(f"--dask {address}: no dask scheduler there (connection refused: "
                        "nothing listens on that port)") from None
    except socket.gaierror as exc:
        raise UserError(f"--dask {address}: no such host {host!r} ({exc.strerror})") from None
    except (OSError, OverflowError, ValueError):
        return  # no route, a name that does not resolve: the handshake says why


class Cluster:
    """Runs waferscope's fusion and inspection tasks on a dask client."""

    def __init__(self, client: Any) -> None:
        self.client = client
        workers = client.scheduler_info().get("workers", {})
        self.n_workers = max(1, len(workers))

    # ------------------------------------------------------------------ generic

    def _wait(self, futures: list[Any], on_result: Callable[[Any], None]) -> None:
        """Wait for every future, calling ``on_result`` as each finishes; the first error is
        raised once the others are cancelled."""
        from distributed import as_completed

        try:
            for fut in as_completed(futures):
                on_result(fut.result())
        except BaseException:
            self.client.cancel(futures)
            raise

    # ------------------------------------------------------------------ fusion

    def fuse(self, fusion: Any, level0: Any, blocks: list[list[tuple[int, int]]],
             tick: Callable[[], None]) -> None:
        """Fuse level 0, a task per block of chunks
        (:func:`scanner.stitching.mosaic.fuse_block`)."""
        from scanner.stitching.mosaic import fuse_block

        shared = self.client.scatter(fusion, broadcast=True)  # the flat-field once per worker
        futures = [self.client.submit(fuse_block, shared, level0, block, pure=False)
                   for block in blocks]
        self._wait(futures, lambda n: [tick() for _ in range(n)])

    def pyramid(self, arrays: list[Any], chunk: int, tick: Callable[[], None]) -> None:
        """Levels 1.. of a multiscale image, a task per chunk row of each level in turn."""
        from scanner.ngff import downsample_block

        for k in range(1, len(arrays)):
            rows, cols = arrays[k].shape
            n_r, n_c = -(-rows // chunk), -(-cols // chunk)
            futures = [self.client.submit(downsample_block, arrays[k - 1], arrays[k], chunk,
                                          [(i, j) for j in range(n_c)], pure=False)
                       for i in range(n_r)]
            self._wait(futures, lambda n: [tick() for _ in range(n)])

    # ------------------------------------------------------------------ inspection

    def stream_maps(
        self, model: Model, mosaic: Path, scale: float, arrays: dict[str, Any],
        scratch_path: Path, *, tiling: Any, level: float, mask: Any, skip_empty: bool,
        progress: Callable[[int, int], None] | None = None, edge: Any = None,
    ) -> Any:
        """:func:`scanner.inspection.streammaps.stream_maps` as dask tasks (see the module's
        notes)."""
        import shutil

        from scanner.inspection.streammaps import create_scratch, planned_windows
        from scanner.inspection.tiled import InferenceStats

        path = getattr(model, "path", None)
        if not path or not Path(path).is_file():
            raise UserError("--dask: the inspection model must be a file (each worker loads "
                            "it from there)")
        t_start = time.perf_counter()
        n_rows, n_cols = tiling.grid
        total = n_rows * n_cols
        todo, skipped = planned_windows(tiling, mask)
        stats = InferenceStats(skipped=skipped)
        stats.extra["level"] = float(level)
        scratch = create_scratch(Path(scratch_path), tiling)
        from models.backbone import feature_precision

        weights = Path(path).resolve()
        stat = weights.stat()
        job = _WindowJob(model=str(weights), model_version=(stat.st_mtime_ns, stat.st_size),
                         precision=feature_precision(),
                         mosaic=str(Path(mosaic).absolute()), scale=scale,
                         tiling=tiling, level=level, skip_empty=skip_empty, scratch=scratch,
                         decision_threshold=getattr(model, "decision_threshold", None))
        by_row: list[list[Any]] = [[] for _ in range(n_rows)]
        compute = []
        for i in range(n_rows):
            row = [ij for ij in todo if ij[0] == i]
            for k in range(0, len(row), WINDOWS_PER_TASK):
                fut = self.client.submit(_compute_task, job, row[k : k + WINDOWS_PER_TASK],
                                         pure=False)
                by_row[i].append(fut)
                compute.append(fut)
        blends = [
            self.client.submit(_blend_task, ci, scratch, tiling, arrays, mask, edge,
                               [f for r in (ci - 1, ci, ci + 1) if 0 <= r < n_rows
                                for f in by_row[r]], pure=False)
            for ci in range(n_rows)
        ]

        def on_result(result: Any) -> None:
            if isinstance(result, dict):
                for key in ("windows", "skipped"):
                    setattr(stats, key, getattr(stats, key) + int(result[key]))
                for key in ("read_s", "network_s"):
                    setattr(stats, key, getattr(stats, key) + float(result[key]))
                stats.input_px += int(result["input_px"])
                if progress is not None:
                    progress(min(stats.windows + stats.skipped, total), total)

        try:
            self._wait(compute + blends, on_result)
        finally:
            shutil.rmtree(scratch_path, ignore_errors=True)
        if progress is not None:
            progress(total, total)
        stats.total_s = time.perf_counter() - t_start
        return stats


class _WindowJob(BaseModel):
    """What a worker needs to compute windows: paths and numbers, never the model itself."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    model: str
    #: the model file's modification time (ns) and size: a worker that loaded an earlier
    #: file of that name (a model trained again with --overwrite) loads it again
    model_version: tuple[int, int] = (0, 0)
    #: the client's backbone precision (WAFERSCOPE_FEATURE_PRECISION there): a worker of a
    #: running cluster has its own environment, and bfloat16 features moved maps by 13 %
    precision: str = "float32"
    mosaic: str
    scale: float
    tiling: Any
    level: float
    skip_empty: bool
    scratch: Any
    #: a detector's uncertainty is centred on the threshold inspection applies
    decision_threshold: float | None = None


#: models loaded in this (worker) process, by file and its version
_MODELS: dict[tuple[str, tuple[int, int]], Any] = {}


def worker_threads() -> int:
    """Torch threads of a task in this (worker) process: ``WAFERSCOPE_TORCH_THREADS`` when
    set (1 in a ``local:N`` cluster), else the process's cores."""
    return int(os.environ.get(THREADS_ENV, "0")) or _cores()


def _worker_model(path: str, version: tuple[int, int] = (0, 0)) -> Any:
    """The model of ``path`` (its file at ``version``), loaded once per worker process, on
    the worker's threads."""
    import torch

    from scanner.inspection.inspect import load_inspection_model

    key = (path, tuple(version))
    if key not in _MODELS:
        for old in [k for k in _MODELS if k[0] == path]:
            del _MODELS[old]  # an earlier file of that name
        _MODELS[key] = load_inspection_model(path)
    threads = worker_threads()
    torch.set_num_threads(threads)
    model = _MODELS[key]
    if hasattr(model, "num_threads"):
        model.num_threads = threads
    return model


def _compute_task(job: _WindowJob, windows: list[tuple[int, int]]) -> dict[str, float]:
    """Compute ``windows`` into the scratch store (a dask task); returns its statistics."""
    import torch

    from models.backbone import PRECISION_ENV
    from scanner.inspection.streammaps import compute_windows
    from scanner.inspection.tiled import GridReader
    from scanner.ngff import open_mosaic

    os.environ[PRECISION_ENV] = job.precision  # the client's, not this worker's own
    model = _worker_model(job.model, job.model_version)
    if job.decision_threshold is not None and hasattr(model, "decision_threshold"):
        model.decision_threshold = job.decision_threshold
    reader = GridReader(open_mosaic(Path(job.mosaic))[0][0], job.scale)
    with torch.inference_mode():
        stats = compute_windows(model, reader, job.tiling, windows, job.scratch,
                                level=job.level, skip_empty=job.skip_empty)
    return {"windows": stats.windows, "skipped": stats.skipped, "read_s": stats.read_s,
            "network_s": stats.network_s, "input_px": stats.input_px}


def _blend_task(ci: int, scratch: Any, tiling: Any, arrays: dict[str, Any], mask: Any,
                edge: Any, _after: list[Any]) -> int:
    """Blend chunk row ``ci`` of the maps (a dask task, run once its windows are stored)."""
    from scanner.inspection.streammaps import blend_chunk_row

    blend_chunk_row(ci, scratch, tiling, arrays, mask, edge)
    return ci

