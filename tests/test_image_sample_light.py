"""A picture scanned as a recipe's image sample is the light the model's image reader reads
from the same file: MinIsWhite, palette and uncompressed YCbCr TIFFs (read as stored, window
by window, they were a negative, colour-map indices and luma mixed with chroma), tiled,
striped, BigTIFF; CIE L*a*b* refused in one line."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from models.data import read_image
from simulators.samples import ImageSample

#: the window of the picture the tests scan: away from its edges and from its brightest and
#: darkest pixels (a per-window white would show)
ROWS, COLS = slice(20, 60), slice(30, 90)


def _grey() -> np.ndarray:
    """A grey surface (8-bit, 40-200) with a dark spot, its darkest pixels outside the window."""
    from scipy import ndimage

    t = ndimage.gaussian_filter(np.random.default_rng(3).normal(size=(96, 128)), 2)
    t = 60 + 120 * (t - t.min()) / (t.max() - t.min())
    t[40:44, 50:54] = 45  # the defect, in the window
    t[85:90, 5:10] = 200  # the brightest ...
    t[85:90, 110:120] = 40  # ... and the darkest, outside it
    return t.astype(np.uint8)


def _rgb() -> np.ndarray:
    grey = _grey()
    return np.stack([grey, (grey * 0.8).astype(np.uint8),
                     np.clip(grey.astype(int) * 1.1, 0, 255).astype(np.uint8)], -1)


def _write(path: Path, kind: str) -> np.ndarray:
    """Write ``kind`` to ``path``; the light it holds, 0-1 (white = 1)."""
    grey, rgb = _grey(), _rgb()
    stored16 = 65535 - grey.astype(np.uint16) * 257
    if kind == "miniswhite-8":
        tifffile.imwrite(path, 255 - grey, photometric="miniswhite")
    elif kind == "miniswhite-16-tiled":
        tifffile.imwrite(path, stored16, photometric="miniswhite", tile=(32, 32),
                         compression="zlib")
    elif kind == "miniswhite-16-bigtiff":
        tifffile.imwrite(path, stored16, photometric="miniswhite", bigtiff=True)
    elif kind == "miniswhite-4-bit":
        tifffile.imwrite(path, (15 - grey // 16).astype(np.uint8), photometric="miniswhite",
                         bitspersample=4)
        return (grey // 16) / 15.0
    elif kind == "minisblack-12-bit":  # packed 12-bit samples: white is 4095, not 65535
        tifffile.imwrite(path, grey.astype(np.uint16) * 16, bitspersample=12)
        return grey * 16.0 / 4095.0
    elif kind == "miniswhite-float-counts":  # raw counts as floats: white is their largest
        tifffile.imwrite(path, (4095.0 - grey * 16.0).astype(np.float32),
                         photometric="miniswhite", tile=(32, 32))
        return (grey * 16.0 - grey.min() * 16.0) / (4095.0 - grey.min() * 16.0)
    elif kind == "miniswhite-alpha":
        tifffile.imwrite(path, np.dstack([255 - grey, np.full_like(grey, 255)]),
                         photometric="miniswhite", extrasamples=["unassalpha"])
    elif kind in ("palette", "palette-tiled"):
        pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=64)
        colours = np.asarray(pal.convert("RGB"))
        if kind == "palette":
            pal.save(path)  # Pillow's, striped
        else:
            entries = np.zeros((256, 3), np.uint16)
            table = np.asarray(pal.getpalette(), np.uint16).reshape(-1, 3)[:256]
            entries[: len(table)] = table
            tifffile.imwrite(path, np.asarray(pal), photometric="palette",
                             colormap=entries.T * 257, tile=(32, 32), compression="lzw")
        return _luminance(colours) / 255.0
    elif kind == "ycbcr":  # Pillow's uncompressed YCbCr
        Image.fromarray(rgb).convert("YCbCr").save(path, compression=None)
        return np.asarray(Image.fromarray(rgb).convert("YCbCr"))[..., 0] / 255.0
    elif kind == "ycbcr-tiled":
        ycc = np.asarray(Image.fromarray(rgb).convert("YCbCr"))
        tifffile.imwrite(path, ycc, photometric="ycbcr", subsampling=(1, 1), tile=(32, 32))
        return ycc[..., 0] / 255.0
    else:
        raise AssertionError(kind)
    return grey / 255.0


def _luminance(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2gray

    return rgb2gray(rgb.astype(np.float64))


KINDS = ["miniswhite-8", "miniswhite-16-tiled", "miniswhite-16-bigtiff", "miniswhite-4-bit",
         "minisblack-12-bit", "miniswhite-float-counts", "miniswhite-alpha", "palette",
         "palette-tiled", "ycbcr", "ycbcr-tiled"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_scanned_tiff_window_is_the_light_the_file_reader_reads(tmp_path: Path,
                                                                   kind: str) -> None:
    path = tmp_path / "pic.tif"
    light = _write(path, kind)
    learnt = read_image(path).astype(np.float64)[ROWS, COLS]
    sample = ImageSample(path, pixel_size_um=1.0)
    # a camera field on the file's own grid, away from (0, 0): the window's pixels
    seen = sample.render(float(COLS.start), float(ROWS.start), (40, 60), 1.0).astype(np.float64)
    sample.close()
    # the same light up to the reader's units (the model divides by the brightness level):
    # read as stored, a MinIsWhite picture was its negative (correlation -1), a palette's
    # indices correlated -0.99 and YCbCr's luma and chroma 0.77
    assert np.corrcoef(seen.ravel(), learnt.ravel())[0, 1] > 0.9999
    np.testing.assert_allclose(seen / seen.mean(), learnt / learnt.mean(), rtol=1e-4, atol=1e-5)
    # ... and at the level the file states: white is its white (a palette's 16-bit colours,
    # a 4-bit picture's 15; Pillow writes colour-map entries as 256 v, 0.4 % under white),
    # the spot dark as on the part
    np.testing.assert_allclose(seen, light[ROWS, COLS], atol=5e-3 if kind == "palette" else 2e-3)
    assert seen[20:24, 20:24].mean() < 0.6 * np.median(seen)


def test_a_min_is_white_tiled_tiff_is_still_read_window_by_window(tmp_path: Path) -> None:
    # turning a MinIsWhite picture over needs its white from its tags, not its largest pixel:
    # a window's render reads the tiles under it, not the file
    n = 2048
    rr = np.arange(n, dtype=np.uint32)
    big = ((rr[:, None] * 7 + rr[None, :] * 13) % 65521).astype(np.uint16)  # 8 MiB
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, 65535 - big, photometric="miniswhite", tile=(256, 256),
                     compression="zlib")
    s = ImageSample(path, pixel_size_um=1.0)
    tracemalloc.start()
    try:
        img = s.render(1000.0, 1500.0, (128, 128), 1.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        s.close()
    np.testing.assert_allclose(img, big[1500:1628, 1000:1128] / 65535.0, atol=1e-6)
    assert peak < 3 * 2**20


def test_a_cielab_tiff_sample_is_refused_in_one_line(tmp_path: Path) -> None:
    # L*, a*, b* were scanned as if R, G, B while training refused the same file
    from typer.testing import CliRunner

    from scanner.cli import app

    Image.fromarray(_rgb()).convert("LAB").save(tmp_path / "lab.tif")
    with pytest.raises(ValueError, match="lab.tif.*CIELAB"):
        ImageSample(tmp_path / "lab.tif", pixel_size_um=1.0)
    recipe = tmp_path / "lab.yaml"
    recipe.write_text("sample: {kind: image, path: lab.tif, pixel_size_um: 1.0}\n"
                      "microscope: {kind: simulated, camera: {width: 64, height: 64}}\n")
    res = CliRunner().invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: lab.yaml: sample.path:") \
        and "CIELAB" in lines[0] and "grey or RGB" in lines[0], lines
