"""Device calls under a watchdog, retried with back-off when the hardware fails.

One place for what a scan, its alignment and the camera calibration do around every move and
snap: a call that hangs is abandoned after a timeout (:func:`watched`), and a transient fault
(:func:`devices.errors.is_transient`) is tried again, a refusal or a programming error never
(:func:`retried`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from devices.errors import HardwareTimeout, is_transient

log = logging.getLogger("waferscope.devices")


class GaveUp(RuntimeError):
    """A device action given up: refused by the device, or failing past its retries."""


def watched(action: Callable[[], object], timeout_s: float, what: str) -> None:
    """Run ``action``; raise :class:`HardwareTimeout` if it has not returned in ``timeout_s``.

    A call into a device cannot be cancelled from outside, so it runs on a daemon thread that
    is abandoned if it hangs (the next attempt, or the operator, deals with the device).
    """
    box: dict[str, BaseException] = {}

    def target() -> None:
        try:
            action()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"watchdog {what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise HardwareTimeout(f"{what} did not finish within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]


def retried(action: Callable[[], object], what: str, *, retries: int, timeout_s: float,
            backoff_s: float = 0.05, on_retry: Callable[[], None] | None = None) -> None:
    """Run ``action`` under the watchdog; retry transient hardware faults with back-off.

    A device's refusal (a plain ``RuntimeError`` subclass that is not transient: a move
    outside the travel, a limit switch) raises :class:`GaveUp` at once, as do transient
    faults past ``retries`` more attempts (each retry calls ``on_retry``, and is logged); a
    programming error propagates (it would fail the same way every time).
    """
    for attempt in range(retries + 1):
        try:
            watched(action, timeout_s, what)
            return
        except Exception as exc:
            if not is_transient(exc):
                if isinstance(exc, RuntimeError):
                    raise GaveUp(f"{what}: {exc}") from None
                raise
            log.warning("%s failed (attempt %d/%d): %s: %s", what, attempt + 1, retries + 1,
                        type(exc).__name__, exc)
            if attempt == retries:
                raise GaveUp(f"{what}: {type(exc).__name__}: {exc} "
                             f"(after {retries + 1} attempts)") from None
            if on_retry is not None:
                on_retry()
            time.sleep(backoff_s * 2**attempt)
