"""Picture files as users' cameras and programs write them, read as the light they hold:
16-bit colour PNGs, MinIsWhite and YCbCr TIFFs, grey + alpha and plane-by-plane TIFFs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.color import rgb2gray

from models.data import read_image
from scanner.errors import UserError


def _texture(shape: tuple[int, int] = (64, 80), seed: int = 0) -> np.ndarray:
    """A grey surface of 60-180 (8-bit) with a dark spot: what a defect looks like."""
    from scipy import ndimage

    t = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2)
    t = 60 + 120 * (t - t.min()) / (t.max() - t.min())
    t[30:34, 40:44] = 20
    return t.astype(np.uint8)


def test_a_16_bit_colour_png_keeps_its_bits(tmp_path: Path) -> None:
    # Pillow keeps 8 of a 16-bit RGB PNG's bits: a 12-bit camera's colour picture (0-4095
    # in 16-bit samples) was read as 9 grey levels (3 to 10), the spot's contrast changed
    import imagecodecs

    grey = _texture().astype(np.uint16) * 16  # 12-bit counts
    rgb = np.stack([grey, grey * 9 // 10, grey * 8 // 10], axis=-1).astype(np.uint16)
    rgba = np.dstack([rgb, np.full(grey.shape, 65535, np.uint16)])
    la = np.dstack([grey, np.full(grey.shape, 65535, np.uint16)])
    for name, pixels, want in (("rgb", rgb, rgb2gray(rgb.astype(np.float32))),
                               ("rgba", rgba, rgb2gray(rgb.astype(np.float32))),
                               ("la", la, grey.astype(np.float32))):
        (tmp_path / f"{name}.png").write_bytes(imagecodecs.png_encode(pixels))
        read = read_image(tmp_path / f"{name}.png")
        assert read.shape == grey.shape
        np.testing.assert_allclose(read, want, rtol=1e-5, err_msg=name)
        assert len(np.unique(read)) > 50  # not a handful of levels (9 were read)


def test_a_16_bit_colour_png_cut_short_is_still_refused(tmp_path: Path) -> None:
    import imagecodecs

    grey = _texture().astype(np.uint16) * 257
    data = imagecodecs.png_encode(np.stack([grey] * 3, axis=-1))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.png"):
        read_image(tmp_path / "cut.png")


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "bool"])
def test_a_min_is_white_tiff_is_read_as_light_not_as_its_negative(tmp_path: Path,
                                                                   dtype: str) -> None:
    # TIFF's MinIsWhite (scanners, X-ray and document cameras): 0 is white; read as stored,
    # the picture was its negative, the dark spot bright
    grey = _texture()
    light = {"uint8": grey, "uint16": grey.astype(np.uint16) * 257,
             "float32": (grey / 255.0).astype(np.float32), "bool": grey > 120}[dtype]
    stored = {"uint8": lambda a: 255 - a, "uint16": lambda a: 65535 - a,
              "float32": lambda a: 1.0 - a, "bool": lambda a: ~a}[dtype](light)
    tifffile.imwrite(tmp_path / "mw.tif", stored, photometric="miniswhite")
    read = read_image(tmp_path / "mw.tif")
    np.testing.assert_allclose(read, light.astype(np.float32), atol=1e-6)
    if dtype != "bool":
        assert read[32, 42] < np.median(read) / 2  # the spot is dark, as on the part


def test_an_uncompressed_ycbcr_tiff_is_read_as_its_luma(tmp_path: Path) -> None:
    # tifffile returns the stored Y, Cb, Cr of a TIFF that is not JPEG-compressed: they were
    # mixed as if R, G, B, the picture's contrast cut to a sixth (relative 0.92-1.08, not
    # 0.49-1.48)
    grey = _texture()
    rgb = np.stack([grey, (grey * 0.9).astype(np.uint8), (grey * 0.8).astype(np.uint8)], -1)
    Image.fromarray(rgb).convert("YCbCr").save(tmp_path / "ycc.tif")
    with tifffile.TiffFile(tmp_path / "ycc.tif") as tif:
        assert tif.pages[0].photometric == 6 and tif.pages[0].compression == 1
    read = read_image(tmp_path / "ycc.tif")
    luma = np.asarray(Image.fromarray(rgb).convert("YCbCr"))[..., 0].astype(np.float32)
    np.testing.assert_array_equal(read, luma)
    assert np.abs(read - rgb2gray(rgb.astype(np.float32))).max() < 3  # the picture's grey


@pytest.mark.parametrize("layout", ["contig", "separate", "16-bit", "associated"])
def test_a_grey_tiff_with_alpha_is_read_as_its_grey(tmp_path: Path, layout: str) -> None:
    # GIMP's or Photoshop's grey TIFF with transparency: "holds several images (2 along S)",
    # while the same picture as a grey + alpha PNG was read
    grey = _texture()
    if layout == "16-bit":
        grey = grey.astype(np.uint16) * 257
    alpha = np.full_like(grey, np.iinfo(grey.dtype).max)
    stack = np.stack([grey, alpha]) if layout == "separate" else np.dstack([grey, alpha])
    tifffile.imwrite(tmp_path / "ga.tif", stack, photometric="minisblack",
                     planarconfig="separate" if layout == "separate" else "contig",
                     extrasamples=["assocalpha" if layout == "associated" else "unassalpha"])
    np.testing.assert_array_equal(read_image(tmp_path / "ga.tif"), grey.astype(np.float32))


def test_a_grey_tiff_with_a_second_grey_sample_is_still_refused(tmp_path: Path) -> None:
    # two samples of which the second is not alpha: two images, which the user chooses among
    grey = _texture()
    tifffile.imwrite(tmp_path / "two.tif", np.dstack([grey, grey[::-1]]),
                     photometric="minisblack", extrasamples=["unspecified"])
    with pytest.raises(UserError, match="two.tif.*several images"):
        read_image(tmp_path / "two.tif")


def test_a_cmyk_tiff_stored_plane_by_plane_is_read_as_its_contiguous_twin(
        tmp_path: Path) -> None:
    # the four ink planes (C, M, Y, K) were turned into R, G, B, A and read as light
    grey = _texture()
    rgb = np.stack([grey, (grey * 0.9).astype(np.uint8), (grey * 0.8).astype(np.uint8)], -1)
    ink = np.asarray(Image.fromarray(rgb).convert("CMYK"))
    tifffile.imwrite(tmp_path / "contig.tif", ink, photometric="separated")
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(ink, -1, 0), photometric="separated",
                     planarconfig="separate")
    contig = read_image(tmp_path / "contig.tif")
    np.testing.assert_allclose(contig, rgb2gray(rgb.astype(np.float32)), atol=1.0)
    np.testing.assert_array_equal(read_image(tmp_path / "planar.tif"), contig)


def test_a_palette_tiff_is_read_as_its_colours_not_its_indices(tmp_path: Path) -> None:
    # tifffile returns a palette TIFF's colour-map indices: read as grey levels, a picture of
    # 64 colours became levels 0-63 in the palette's order (relative 0-2.1, not 0.63-1.33),
    # and a grey palette stored white-first its negative
    grey = _texture()
    rgb = np.stack([grey, (grey * 0.9).astype(np.uint8), (grey * 0.8).astype(np.uint8)], -1)
    palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=64)
    palette.save(tmp_path / "p.tif")
    palette.save(tmp_path / "p.png")
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        assert tif.pages[0].photometric == 3
    read, twin = read_image(tmp_path / "p.tif"), read_image(tmp_path / "p.png")
    np.testing.assert_allclose(read / np.median(read), twin / np.median(twin), rtol=1e-3)
    cmap = np.array([np.arange(256)[::-1] * 257] * 3, np.uint16)  # index i is grey 255 - i
    tifffile.imwrite(tmp_path / "rev.tif", 255 - grey, photometric="palette", colormap=cmap)
    np.testing.assert_allclose(read_image(tmp_path / "rev.tif"), grey.astype(np.float32) * 257,
                               rtol=1e-6)


def test_a_tiff_without_its_photometric_tag_is_read_as_stored(tmp_path: Path) -> None:
    # tifffile calls a missing tag MinIsWhite: bare samples are not turned into a negative
    import struct

    grey = _texture()
    tifffile.imwrite(tmp_path / "bare.tif", grey)
    with tifffile.TiffFile(tmp_path / "bare.tif") as tif:
        at = tif.pages[0].tags["PhotometricInterpretation"].offset
    data = bytearray((tmp_path / "bare.tif").read_bytes())
    data[at: at + 2] = struct.pack("<H", 65000)  # the tag renamed to one nobody knows
    (tmp_path / "bare.tif").write_bytes(bytes(data))
    with tifffile.TiffFile(tmp_path / "bare.tif") as tif:
        assert "PhotometricInterpretation" not in tif.pages[0].tags
    np.testing.assert_array_equal(read_image(tmp_path / "bare.tif"), grey.astype(np.float32))


def test_a_cielab_tiff_is_refused_in_one_line_not_read_as_rgb(tmp_path: Path) -> None:
    # L*, a*, b* were mixed as if R, G, B into a "luminance"
    from typer.testing import CliRunner

    from scanner.cli import app

    grey = _texture()
    rgb = np.stack([grey, (grey * 0.9).astype(np.uint8), (grey * 0.8).astype(np.uint8)], -1)
    Image.fromarray(rgb).convert("LAB").save(tmp_path / "lab.tif")
    with pytest.raises(UserError, match="lab.tif.*CIELAB"):
        read_image(tmp_path / "lab.tif")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "lab.tif"), "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "lab.tif" in lines[0] and "grey or RGB" in lines[0], lines
    assert not (tmp_path / "out").exists()
