"""Random draws keyed by what is being done, not by how many draws came before.

A resumed scan, or a retried move, must see what an uninterrupted run would have seen: the
stage's landing error at a tile and the camera's noise in a tile are drawn from the seed, the
commanded position and how many times that position was visited, never from a shared stream
whose state depends on everything that happened before.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter

import numpy as np


class KeyedRandom:
    """Independent random generators per key (a commanded position) and visit.

    Parameters
    ----------
    seed : int
        The simulator's seed.
    stream : str
        What draws (``"xy"``, ``"z"``, ``"camera"``), so that streams never coincide.
    """

    def __init__(self, seed: int, stream: str) -> None:
        self.seed = int(seed) & 0xFFFF_FFFF_FFFF_FFFF
        self.stream = stream
        self._visits: Counter[tuple[int, ...]] = Counter()

    def rng(self, *key: float) -> np.random.Generator:
        """A generator for the next visit of ``key`` (floats, quantised to 1 nm)."""
        q = tuple(int(round(float(k) * 1000)) for k in key)
        visit = self._visits[q]
        self._visits[q] += 1
        digest = hashlib.blake2b(repr((self.stream, q, visit)).encode(), digest_size=16).digest()
        return np.random.default_rng([self.seed, *struct.unpack("<4I", digest)])
