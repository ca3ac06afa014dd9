"""Acquisition: the plan, pre-alignment, focus and the MDA run that fills the tiles store."""
