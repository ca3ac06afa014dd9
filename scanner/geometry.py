"""Sample outlines in stage coordinates, from the recipe alone (no hardware, no simulator).

Coordinates are stage micrometres; x grows with the image column and y with the image row, so
a wafer's notch or flat "at 6 o'clock" lies towards +y. The outlines live in the lowest layer
(:mod:`simulators.geometry`, which the simulated focal surface uses too) and are re-exported
here.
"""

from __future__ import annotations

from simulators.geometry import image_shape as image_shape
from simulators.geometry import place as place
from simulators.geometry import usable_polygon as usable_polygon
from simulators.geometry import wafer_outline as wafer_outline
