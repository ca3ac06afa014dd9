"""Inspection: the detector's maps, die-to-die comparison, plain surfaces, defects, drift."""
