"""Fault injection for the emulated serial stage controllers.

A :class:`FaultInjector` decides, for each command a controller emulator receives, whether
the command goes wrong and how:

``garbled``
    The command is executed but its reply arrives with line noise (bytes outside the
    protocol's ASCII alphabet), so the driver cannot parse it.
``lost``
    The command is executed but no reply comes back: the driver's read times out.
``error``
    The controller refuses the command with an error reply (``E,n`` / ``:N-n``); the
    command is not executed.
``stuck``
    (moves only) The move runs but the axes' busy flag never clears until a stop command.
``limit``
    (moves only) A limit switch trips part way: the stage stops short of the target and the
    controller reports the switch (``LMT`` / ``RS X-``).

Faults are drawn from a seeded :class:`numpy.random.Generator` at ``rate`` per command; a
queue of "the next applicable command fails with X" comes first, for deterministic tests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

FAULT_KINDS: tuple[str, ...] = ("garbled", "lost", "error", "stuck", "limit")
MOVE_FAULTS = frozenset({"stuck", "limit"})


@dataclass(frozen=True)
class Fault:
    """One injected fault.

    Attributes
    ----------
    kind : str
        One of :data:`FAULT_KINDS`.
    code : int or None
        Controller error code for ``error`` faults (None: the protocol's default).
    """

    kind: str
    code: int | None = None


def _check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown:
        raise ValueError(f"unknown fault kind(s) {unknown}; known: {', '.join(FAULT_KINDS)}")
    return kinds


class FaultInjector:
    """Decides which commands fail, and how.

    Parameters
    ----------
    rate : float
        Probability in [0, 1) that a command fails; each command draws once.
    kinds : iterable of str
        Kinds drawn at random (uniformly among those that apply to the command: ``stuck``
        and ``limit`` apply to moves only).
    seed : int or None
        Seed of the generator that draws the faults and the garbling noise.
    """

    def __init__(
        self, rate: float = 0.0, kinds: Iterable[str] = FAULT_KINDS, seed: int | None = None
    ) -> None:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"fault rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.kinds = _check_kinds(kinds)
        self.rng = np.random.default_rng(seed)
        self._queued: deque[Fault] = deque()

    def fail_next(self, kind: str, code: int | None = None) -> None:
        """Make the next command that ``kind`` applies to fail with it (queued in order)."""
        _check_kinds([kind])
        self._queued.append(Fault(kind, code))

    def clear(self) -> None:
        """Forget queued faults."""
        self._queued.clear()

    @property
    def pending(self) -> list[Fault]:
        """Queued faults not yet used."""
        return list(self._queued)

    def draw(self, is_move: bool) -> Fault | None:
        """The fault for the next command, or None.

        Parameters
        ----------
        is_move : bool
            Whether the command starts a move (only then can ``stuck``/``limit`` apply).
        """
        for i, fault in enumerate(self._queued):
            if is_move or fault.kind not in MOVE_FAULTS:
                del self._queued[i]
                return fault
        # the generator is only consulted when faults are on, so a rate of 0 leaves the
        # stream (and the garbling noise of queued faults) independent of the command count
        if self.rate > 0.0 and self.rng.random() < self.rate:
            kinds = [k for k in self.kinds if is_move or k not in MOVE_FAULTS]
            if kinds:
                return Fault(kinds[int(self.rng.integers(len(kinds)))])
        return None

    def garble(self, reply: bytes, terminator: bytes) -> bytes:
        """``reply`` with one or two bytes replaced by non-ASCII noise, terminator kept.

        The noise is always outside 7-bit ASCII, so a driver can tell that the line is
        damaged (a flipped digit that still parses would be undetectable without a checksum,
        which these protocols do not have).
        """
        body = bytearray(reply.removesuffix(terminator))
        for _ in range(int(self.rng.integers(1, 3))):
            noise = int(self.rng.integers(0x80, 0xFF))
            if body:
                body[int(self.rng.integers(len(body)))] = noise
            else:
                body.append(noise)
        return bytes(body) + terminator
