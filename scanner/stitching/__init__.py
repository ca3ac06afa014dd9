"""Stitching: camera calibration, tile registration and the fused OME-NGFF mosaic."""
