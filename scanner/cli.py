"""The ``waferscope`` command line.

Exit codes: 0 done, 2 bad input (one clear line on stderr), 1 anything else.

The commands are in :mod:`scanner.cli_scan` (a scan's stages) and :mod:`scanner.cli_tools`
(training, drift, camera calibration, napari); what they share in :mod:`scanner.cli_common`.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import sys
import threading
from typing import Any

# importing the command modules registers their commands on the app, in this order (the
# order ``waferscope --help`` lists them in): a scan's stages first, then the tools
from scanner import cli_scan, cli_tools  # noqa: F401
from scanner.cli_common import SAMPLE_KINDS, app  # noqa: F401


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM is handled like Ctrl-C: the scan stops cleanly and can be resumed."""
    raise KeyboardInterrupt


def _redeliver_interrupt(unraisable: Any) -> None:
    """``sys.unraisablehook``: a Ctrl-C or SIGTERM whose KeyboardInterrupt was raised while
    Python ran a callback it cannot raise from (a weak reference's, a ``__del__``) is
    delivered again, to the code the callback interrupted; it was printed as "Exception
    ignored" and lost, and the scan ran on to its end (1 SIGTERM in about 12)."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        # from another thread, a moment later: raised now, it would land in this hook (and be
        # ignored again); SIGTERM's handler, as SIGINT may be ignored (a background job)
        threading.Timer(0.05, _thread.interrupt_main, args=(signal.SIGTERM,)).start()
        return
    sys.__unraisablehook__(unraisable)


def install_signal_handlers() -> None:
    """SIGTERM stops a command as Ctrl-C does, and neither is lost in a callback."""
    signal.signal(signal.SIGTERM, _terminate)
    sys.unraisablehook = _redeliver_interrupt


class OneLineFormatter(logging.Formatter):
    """A logged error is one line, its exception's type and message after it: work that fails
    in the background (a full disk while a tile is processed) printed a traceback over the
    one line that says what to do. ``WAFERSCOPE_DEBUG=1`` shows tracebacks."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record = logging.makeLogRecord({
                **record.__dict__, "msg": f"{record.getMessage()}: {type(exc).__name__}: {exc}",
                "args": None, "exc_info": None, "exc_text": None})
        return super().format(record)


def main() -> None:
    """Entry point for ``python -m scanner``."""
    install_signal_handlers()
    # a log file that cannot be written (a full disk) must not bury the one line that says so
    logging.raiseExceptions = False
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # pymmcore-plus sets its own logger to DEBUG (for its log file); its records reach the root
    # handler whatever the root's level, so the handler itself must filter them.
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)
        if not os.environ.get("WAFERSCOPE_DEBUG"):
            handler.setFormatter(OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    import typer

    # click's (or typer's own copy of click's) base of usage errors, whichever typer uses
    click_exception = next(c for c in typer.BadParameter.__mro__
                           if c.__name__ == "ClickException")
    try:
        code = app(standalone_mode=False)
    except click_exception as exc:
        # a usage error (a missing argument, an unknown option, a value that is no number) is
        # bad input: one line, as every other (click draws a usage block and a boxed panel)
        where = exc.ctx.command_path if getattr(exc, "ctx", None) else "waferscope"
        if exc.format_message():  # none: no arguments at all, and the help was shown
            print(f"error: {exc.format_message()} (see `{where} --help`)", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
