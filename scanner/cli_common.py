"""What the ``waferscope`` commands share: the typer app, the consoles, errors as one line and
an exit code (:func:`_friendly`), progress bars and the common options."""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from models.errors import InputError
from scanner.errors import UserError, undecodable
from scanner.events import StageEvents

app = typer.Typer(
    name="waferscope",
    help="Scan wafers and solar cells under a motorized microscope and find their defects.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Paths are printed whole (no wrapping) so that they can be copied from the terminal.
out = Console(soft_wrap=True, emoji=False)
err = Console(stderr=True, emoji=False)

F = TypeVar("F", bound=Callable[..., Any])

#: the recipe's sample kinds (``scanner.recipe``), for ``inspect --sample-kind``
SAMPLE_KINDS = ("wafer", "pv_cell", "rectangle", "image")


#: errors of a full, over-quota, read-only or forbidden destination (exit 2, one line)
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES,
                   errno.EPERM, errno.ENAMETOOLONG}


#: the commands that acquire tiles (an interrupted one is continued with `resume`)
_ACQUIRING = frozenset({"run", "resume"})


def _storage_message(exc: OSError, output: str | None = None, acquiring: bool = False) -> str:
    """One line for a storage error: a file that may not be read (a calibration, a ``.cfg``, a
    model made unreadable), else a destination that cannot be written; ``output``: the
    command's destination, named when the error names no file (a full disk met inside a
    library's write: "cannot write (File too large)" said not where). ``acquiring`` (run,
    resume): where a scan was started, ``resume`` is offered."""
    name = exc.filename or output
    where = f"{name}: " if name else ""
    if exc.errno == errno.ENAMETOOLONG:  # a path given, not the disk: no space to free
        return f"{where}name too long for the file system ({exc.strerror}); choose a shorter one"
    if exc.errno in (errno.EACCES, errno.EPERM) and name and os.path.exists(name) \
            and not os.access(name, os.R_OK):
        return f"{where}cannot read ({exc.strerror}); check its permissions"
    resume = " (a stopped scan continues with `waferscope resume SCAN`)" \
        if acquiring and _in_a_scan(name) else ""
    return f"{where}cannot write ({exc.strerror}); free space or choose another folder{resume}"


def _in_a_scan(path: str | None) -> bool:
    """Whether ``path`` lies in a scan folder that has its record (a scan to resume); a run
    refused before it could write one (a read-only disk) has none, and was told to resume."""
    from scanner.scanfolder import SCAN_JSON

    if not path:
        return False
    here = Path(path).absolute()
    return any((p / SCAN_JSON).is_file() for p in [here, *here.parents][:5])


def _output_named(kwargs: dict[str, Any]) -> str | None:
    """The folder or file a command writes (``--out``; else the scan folder that ``resume``,
    ``stitch`` and ``report`` write into), as given; None when it names none."""
    for key in ("out_dir", "model_out", "save", "scan"):
        if isinstance(kwargs.get(key), str | os.PathLike):
            return str(kwargs[key])
    return None


def _inputs_named(kwargs: dict[str, Any]) -> str | None:
    """The folders or files a command reads (its ``scan``, ``target`` or ``--good``), as
    given, to name them in a message about damaged data; None when it names none."""
    for key in ("scan", "target", "good"):
        value = kwargs.get(key)
        paths = value if isinstance(value, list | tuple) else [value] if value else []
        if paths:
            return ", ".join(str(p) for p in paths)
    return None


def typed_path(value: Any) -> Any:
    """A path as the user typed it, made what they meant, once, for every command: ``~``
    expanded (quoted, or after ``--out=``, the shell leaves it: a folder named ``~`` was made
    in the working folder), and a path with no name of its own (``.``, ``..``, ``sub/..``)
    made absolute (``--model .`` failed with "PosixPath('.') has an empty name", ``inspect .``
    inside a mosaic took it for a folder of images, ``drift .`` printed an empty scan name).
    Lists and tuples of paths are made so item by item; anything else is returned as it is."""
    if isinstance(value, list | tuple):
        return type(value)(typed_path(v) for v in value)
    if not isinstance(value, Path):
        return value
    if value.parts and value.parts[0].startswith("~"):
        try:
            value = value.expanduser()
        except RuntimeError:  # no home folder known for that user: named as typed
            pass
    if value.name in ("", ".."):
        value = Path(os.path.abspath(value))
    return value


def _friendly(func: F) -> F:
    """Turn bad input (UserError, a full disk) into one line + exit 2, anything else into one
    line + exit 1. The command's paths are taken as :func:`typed_path` makes them."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs = {key: typed_path(value) for key, value in kwargs.items()}
        try:
            try:
                return func(*args, **kwargs)
            except OSError as exc:
                if exc.errno not in _STORAGE_ERRNOS or os.environ.get("WAFERSCOPE_DEBUG"):
                    raise
                # a full or read-only disk, or a file we may not read: the user can act on
                # it, as on bad input
                message = _storage_message(exc, _output_named(kwargs),
                                           func.__name__ in _ACQUIRING)
                err.print(f"[bold red]error:[/] {escape(message)}", highlight=False,
                          soft_wrap=True)
                raise typer.Exit(2) from None
        except InputError as exc:  # ours and the model package's bad input (UserError derives)
            # escaped: a message may hold brackets ("waferscope[napari]") that are not markup
            message = _naming_recipe(str(exc), kwargs.get("recipe"))
            err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:
            if exc.args:  # the scan said what it kept (a replaced scan put back)
                err.print(f"interrupted: {escape(str(exc.args[0]))}", highlight=False,
                          soft_wrap=True)
            elif func.__name__ in _ACQUIRING:
                err.print("interrupted; what was acquired is kept in the scan folder "
                          "(continue with `waferscope resume SCAN`)")
            else:
                err.print("interrupted")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as exc:
            if os.environ.get("WAFERSCOPE_DEBUG"):
                raise
            if undecodable(exc):  # damaged stored data is bad input, not a bug
                # zarr's other reads of that batch are abandoned; asyncio would log each
                # pending one at exit, burying the one line under dozens
                logging.getLogger("asyncio").setLevel(logging.CRITICAL)
                from scanner.integrity import damaged_data_message

                message = damaged_data_message(exc, _inputs_named(kwargs))  # names the file
                err.print(f"[bold red]error:[/] {escape(message)}", highlight=False,
                          soft_wrap=True)
                raise typer.Exit(2) from None
            err.print(
                f"[bold red]failed:[/] {type(exc).__name__}: {exc} "
                "(set WAFERSCOPE_DEBUG=1 for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


#: a recipe field's name, as errors raised after the recipe was read name it (the simulated
#: sample's ``sample.defects.kinds``, the microscope's ``microscope.config``)
_RECIPE_FIELD = re.compile(r"(sample|microscope|scan|output|stitch)(\.\w+)*:")


def _naming_recipe(message: str, recipe: Any) -> str:
    """``message`` with the recipe file's name in front when it names one of its fields and
    not yet the file (the recipe's own validation does; the microscope and the plan do not)."""
    if (isinstance(recipe, Path) and _RECIPE_FIELD.match(message)
            and not message.startswith("scan.json")):
        return f"{recipe.name}: {message}"
    return message


def check_output(path: Path | None, option: str, folder: bool) -> None:
    """Refuse, before any work, an output that cannot be written: a folder (``folder``) that
    exists as a file, a file that exists as a folder, or a path under an existing file.

    Raises
    ------
    UserError
        Naming the option and the path.
    """
    if path is None:
        return
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: exists and is not a folder")
    if not folder and path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name")
    from scanner.scanfolder import file_in_the_way

    above = file_in_the_way(path)
    if above is not None:
        raise UserError(f"{option} {path}: {above} is a file, not a folder")
    # the nearest folder that exists must take new files: a read-only or forbidden place is
    # refused now, not after minutes of work (access() reports a read-only mount as such)
    nearest = next((p for p in ((path,) if folder else ()) + tuple(path.absolute().parents)
                    if p.is_dir()), None)
    if nearest is not None and not os.access(nearest, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: {nearest} cannot be written (read-only or no "
                        "permission); choose another folder")


class RichObserver:
    """Progress bars for the stages of a scan (slots of its stage signals)."""

    _LABELS = {"acquire": "acquiring tiles", "stitch": "stitching mosaic",
               "register": "registering tiles", "inspect": "inspecting",
               "images": "inspecting images", "report": "writing reports"}

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def connect(self, events: StageEvents) -> StageEvents:
        """Draw the bars from a scan's stage signals; returns them."""
        events.stageStarted.connect(self.stage_started)
        events.stageAdvanced.connect(self.advance)
        events.stageFinished.connect(self.stage_finished)
        return events


    def stage_started(self, stage: str, total: int) -> None:
        """Add a bar of ``total`` steps for ``stage``, with its label (slot of ``stageStarted``)."""
        self.tasks[stage] = self.progress.add_task(self._LABELS.get(stage, stage), total=total)

    def advance(self, stage: str, done: int) -> None:
        """Advance the bar of ``stage`` by ``done`` more steps (slot of ``stageAdvanced``)."""
        if stage in self.tasks:
            self.progress.advance(self.tasks[stage], done)

    def stage_finished(self, stage: str) -> None:
        """Stop the clock of ``stage``'s bar: done, failed or interrupted (``stageFinished``)."""
        if stage in self.tasks:
            self.progress.stop_task(self.tasks[stage])


def stage_bars(progress: Progress) -> StageEvents:
    """Stage signals whose progress is drawn as bars in ``progress``."""
    return RichObserver(progress).connect(StageEvents())


class RateColumn(ProgressColumn):
    """Items per second (tiles, chunks)."""

    def render(self, task: Task) -> Text:
        """The task's rate per second (its final one once finished), or ``-/s`` while unknown."""
        speed = task.finished_speed or task.speed
        return Text(f"{speed:6.1f}/s" if speed else "     -/s", style="cyan")


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<17}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal and not os.environ.get("WAFERSCOPE_PROGRESS"),
    )


RecipeArg = Annotated[Path, typer.Argument(help="Scan recipe (YAML).", show_default=False)]


DaskOption = Annotated[str | None, typer.Option(
    "--dask", help="Run fusion and inspection as dask tasks: local:N (a local cluster of N "
    "worker processes of one core each) or the address of a running dask scheduler (tcp://HOST:PORT).")]


def check_dask(spec: str | None) -> None:
    """Refuse a ``--dask`` that cannot be parsed before anything else is touched (a scan
    folder's lock and record)."""
    if spec is not None:
        from scanner.cluster import ClusterSpec

        ClusterSpec.parse(spec)


def for_workers(path: Path, spec: str | None) -> Path:
    """``path`` absolute when tasks run on dask workers: a worker of a running cluster has its
    own working folder, and a relative scan folder was fused there (an empty mosaic here)."""
    return Path(path).absolute() if spec is not None else Path(path)


@contextmanager
def _cluster(spec: str | None) -> Iterator[Any]:
    """The dask cluster of ``--dask`` (None without it: nothing changes)."""
    if spec is None:
        yield None
        return
    from scanner.cluster import ClusterSpec, open_cluster

    with open_cluster(ClusterSpec.parse(spec)) as cluster:  # refused before anything starts
        yield cluster


AllowIncomplete = Annotated[bool, typer.Option(
    "--allow-incomplete", help="Accept a scan that did not acquire every planned tile.")]


def _duration(seconds: float) -> str:
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}h {minutes:02d}m {sec:04.1f}s" if hours else f"{minutes}m {sec:04.1f}s"


def _print_result(result: Any) -> None:
    out.print(f"scan folder: {result.folder.resolve()}")
    for name, path in result.outputs.items():
        out.print(f"  {name:<16} {path.resolve()}")
    for stage, t in result.timings.items():
        parts = [f"{k.removesuffix('_s')} {_duration(v) if k.endswith('_s') else v}"
                 for k, v in t.items()]
        out.print(f"  {stage} time: " + ", ".join(parts))
