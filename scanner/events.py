"""Signals of a scan's progress (psygnal, as pymmcore-plus reports an MDA's)."""

from __future__ import annotations

from psygnal import Signal, SignalGroup


class StageEvents(SignalGroup):
    """Progress of a scan's stages as psygnal signals, as pymmcore-plus reports an MDA's
    (``core.mda.events``): the CLI connects its progress bars, a GUI or a test its own slots;
    nobody connected means silence."""

    #: a stage begins, with the number of steps it will take
    stageStarted = Signal(str, int)  # noqa: N815 (pymmcore-plus's signal naming)
    #: ``n`` more steps of a stage are done
    stageAdvanced = Signal(str, int)  # noqa: N815
    #: a stage ended (done, failed or interrupted)
    stageFinished = Signal(str)  # noqa: N815
