"""The one-class detector: pretrained patch features against a memory bank of normal ones.

Every stride-8 cell of an image gets the 176 pretrained features of :mod:`models.backbone`;
its anomaly is the distance to the nearest feature in the bank of normal patches built from
the user's good images (:mod:`models.build`), divided by the card's ``score_reference`` (a
high quantile of the same distance on held-out good images), so 1 means "as unusual as the
rarest good patches". Nothing is learned from defects, so a product nobody simulated is
modelled from a single good image or scan of it.

Beside it runs the roughness network of :mod:`models.network` (its weights travel in the same
file): areal roughness Sa is regression, which a memory bank does not do.

The uncertainty of a map pixel is the entropy (bits) of the probability that it is defective,
``sigmoid(log(anomaly / threshold) / tau)``, with ``tau`` the spread of the log-scores of the
highest good patches (card ``uncertainty_log_scale``): 1 at the threshold, falling to 0 as the
score leaves it by several times the spread good surfaces show there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)

from .backbone import FEATURE_DIM, FEATURE_STRIDE, extract
from .bank import BankIndex
from .data import relative
from .gaussian import PositionModel, position_from_state, position_record, zoomed
from .modelfile import (
    GAIN,
    InspectionModel,
    brightness_level,
    predictive_entropy,
)
from .network import InspectionNet

#: the maps are written at this stride (the bank's stride-8 cells upsampled bilinearly), the
#: grid the defect extraction, die-to-die comparison and napari views share
OUTPUT_STRIDE = 4
#: input pixels of context a mosaic window needs on each side: the stride-16 features see
#: about 200 px, and the 3 x 3 pooling at stride 16 a further 16 on each side
CONTEXT_PX = 128
#: window core for mosaics (input px): the backbone's stride-2 activations of a 1.8k window
#: take about 1.2 GB, and the network runs at its full rate per pixel from about 1k
CORE_PX = 1536
#: mirrored context around an image that fits one window (``scanner.inspection.tiled.plan_tiling``)
SMALL_IMAGE_CONTEXT_PX = 32
#: the backbone needs sides that are multiples of its coarsest stride
PAD_MULTIPLE = 16


def uncertainty_bits(anomaly: torch.Tensor, threshold: float, log_scale: float
                     ) -> torch.Tensor:
    """Entropy (bits) of the defect probability ``sigmoid(log(anomaly / threshold) /
    log_scale)`` of an anomaly map: 1 at the threshold, falling to 0 as the score leaves it."""
    z = torch.log(anomaly.clamp_min(1e-6) / threshold) / log_scale
    return predictive_entropy(torch.sigmoid(z))


def needed_cells(cells: int, out: int, margin: int) -> slice:
    """The stride-8 cells that the output-stride map pixels ``[margin, out - margin)`` read.

    :meth:`PatchDetector.anomaly_from_distances` upsamples the cells 2x bilinearly (half-pixel
    centres): map pixel ``o`` reads cells ``floor(o / 2 - 1/4)`` and the one after it.
    """
    if margin <= 0 or out - 2 * margin <= 0:
        return slice(0, cells)
    last = out - margin - 1
    return slice(max(0, margin // 2 - 1), min(cells, (last + 1) // 2 + 1))


class PatchDetector:
    """A memory-bank detector with its card, ready for inference (the ``Model`` protocol of
    :mod:`scanner.inspection.maps`).

    Attributes
    ----------
    bank : Tensor (M, D)
        Normal patch features.
    card : dict
        The JSON card (threshold, ``score_reference``, calibration, backbone record).
    companion : InspectionModel or None
        The roughness network (its anomaly output is not used).
    golden : ndarray (H, W) float32 or None
        The one good image of a design that does not repeat, at ``pixel_size_um``, which a
        scan of the design is compared with (:mod:`scanner.inspection.golden`).
    """

    output_stride = OUTPUT_STRIDE
    context_px = CONTEXT_PX
    core_px = CORE_PX
    #: input pixels along the sample's own border left out of inspection: a cell's features
    #: reach about two cells across it, into what lies beyond the sample
    edge_px = 2 * FEATURE_STRIDE

    def __init__(self, bank: torch.Tensor, card: dict[str, Any],
                 companion: InspectionModel | None = None, path: Path | None = None,
                 position: list[PositionModel] | None = None,
                 golden: np.ndarray | None = None) -> None:
        self.bank = bank.float().contiguous()
        self.position = position
        self.golden = golden
        self.index = BankIndex(self.bank)
        self.card = card
        self.companion = companion
        self.path = path
        self.pixel_size_um = float(card.get("pixel_size_um", 1.0))
        lo, hi = card.get("pixel_size_range_um", [self.pixel_size_um, self.pixel_size_um])
        self.pixel_size_range_um = (float(lo), float(hi))
        self.threshold = float(card.get("threshold", 2.0))
        #: the threshold the uncertainty is centred on: the one inspection applies (a sample
        #: kind's, the user's), set by the caller; the pooled one until then
        self.decision_threshold = self.threshold
        self.score_reference = float(card.get("score_reference", 1.0))
        self.uncertainty_log_scale = float(card.get("uncertainty_log_scale", 0.1))
        self.num_threads = max(1, os.cpu_count() or 1)

    def accepts_pixel_size(self, pixel_size_um: float, tolerance: float = 0.25) -> bool:
        """Whether images at this pixel size are inspected as they are (no resampling)."""
        lo, hi = self.pixel_size_range_um
        return lo * (1 - tolerance) <= pixel_size_um <= hi * (1 + tolerance)

    # ------------------------------------------------------------------ pre-processing

    def brightness_level(self, image: np.ndarray) -> float:
        """Robust level (median) of an image or of a subsample of a mosaic."""
        return brightness_level(image)

    def normalize(self, image: np.ndarray, level: float | None = None) -> np.ndarray:
        """Raw counts to model input: relative reflectance (:func:`models.data.relative`: the
        luminance divided by a level, by default the image's own median).

        For a mosaic cut into windows pass one ``level`` for all of them, so they agree.
        """
        return relative(image, level)

    # ------------------------------------------------------------------ inference

    def distances(self, batch: np.ndarray | torch.Tensor, margin: int = 0) -> torch.Tensor:
        """Nearest-bank distance of every stride-8 cell, ``(N, H/8, W/8)`` (sides rounded up).

        ``batch``: relative reflectance ``(N, H, W)``; padded by reflection to multiples of
        16 for the backbone, the padding's cells dropped again. ``margin``: output-stride
        map pixels along each side that the caller drops (a mosaic window's context); the
        bank is not searched for the cells only they read (:func:`needed_cells`), which
        hold NaN.
        """
        x = torch.as_tensor(np.asarray(batch, dtype=np.float32))
        if x.ndim == 2:
            x = x[None]
        n, h, w = x.shape
        ph, pw = (-h) % PAD_MULTIPLE, (-w) % PAD_MULTIPLE
        x = x[:, None]
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else
                      "replicate")
        feat = extract(x)  # (N, D, H'/8, W'/8)
        hh, ww = -(-h // FEATURE_STRIDE), -(-w // FEATURE_STRIDE)
        feat = feat[:, :, :hh, :ww]
        rows = needed_cells(hh, h // OUTPUT_STRIDE, margin)
        cols = needed_cells(ww, w // OUTPUT_STRIDE, margin)
        if rows == slice(0, hh) and cols == slice(0, ww):
            q = feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1])
            return self.index.distances(q).view(n, hh, ww)
        kept = feat[:, :, rows, cols]
        q = kept.permute(0, 2, 3, 1).reshape(-1, feat.shape[1])
        d = torch.full((n, hh, ww), float("nan"))
        d[:, rows, cols] = self.index.distances(q).view(n, *kept.shape[2:])
        return d

    def anomaly_from_distances(self, d: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Stride-8 distances ``(N, h, w)`` to the anomaly map at the output stride."""
        a = F.interpolate(d[:, None] / self.score_reference, scale_factor=2, mode="bilinear",
                          align_corners=False)[:, 0]
        return a[:, : shape[0], : shape[1]]

    def uncertainty(self, anomaly: torch.Tensor) -> torch.Tensor:
        """Entropy (bits) of the defect probability of an anomaly map (module docstring),
        highest at :attr:`decision_threshold`."""
        return uncertainty_bits(anomaly, self.decision_threshold, self.uncertainty_log_scale)

    def predict(self, batch: np.ndarray, margin: int = 0) -> dict[str, np.ndarray]:
        """Anomaly, roughness and uncertainty maps of a batch of normalised windows.

        Parameters
        ----------
        batch : ndarray, shape (N, H, W)
            Output of :meth:`normalize`; ``H`` and ``W`` multiples of ``output_stride``.
        margin : int
            Map pixels along each side that the caller drops (a mosaic window's context):
            their anomaly and uncertainty are not computed (NaN), the rest are exactly those
            of ``margin=0``.

        Returns
        -------
        dict of ndarray float32, each (N, H/4, W/4)
            ``anomaly`` (nearest-bank distance / ``score_reference``), ``uncertainty``
            (bits), ``roughness`` (Sa, nm) and ``roughness_sigma`` (nm) from the roughness
            network (NaN without one), ``spread`` (0: one bank, no ensemble).
        """
        x = np.asarray(batch, dtype=np.float32)
        if x.ndim == 2:
            x = x[None]
        s = self.output_stride
        if x.shape[1] % s or x.shape[2] % s:
            raise ValueError(f"H and W must be multiples of {s}, got {x.shape[1:]}")
        shape = (x.shape[1] // s, x.shape[2] // s)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            with torch.inference_mode():
                anomaly = self.anomaly_from_distances(self.distances(x, margin), shape)
                out = {"anomaly": anomaly, "uncertainty": self.uncertainty(anomaly),
                       "spread": torch.zeros_like(anomaly)}
                result = {k: v.float().contiguous().numpy() for k, v in out.items()}
        finally:
            torch.set_num_threads(previous)
        result.update(self._roughness(x))
        return result

    def _roughness(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The roughness network's maps of normalised windows ``(N, H, W)`` (NaN without
        one)."""
        s = self.output_stride
        if self.companion is None:
            nan = np.full((x.shape[0], x.shape[1] // s, x.shape[2] // s), np.nan, np.float32)
            return {"roughness": nan, "roughness_sigma": nan.copy()}
        self.companion.num_threads = self.num_threads
        # the network's input: (relative - 1) * gain, as models.modelfile.normalize_image
        return self.companion.predict_roughness((x - np.float32(1.0)) * np.float32(GAIN))

    def predict_aligned(self, x: np.ndarray) -> dict[str, np.ndarray] | None:
        """Every map of a whole normalised image of the aligned part (see
        :meth:`aligned_anomaly`; None for any other image): the position model's anomaly
        and its uncertainty, and roughness with the 32 px of mirrored context
        :meth:`predict_image_normalized` gives. The bank is not searched (its map would be
        replaced), so the backbone runs once."""
        a = self.aligned_anomaly(x)
        if a is None:
            return None
        xp, k = self._with_context(x)
        rough = {name: v[0, k : k + a.shape[0], k : k + a.shape[1]]
                 for name, v in self._roughness(xp[None].astype(np.float32)).items()}
        with torch.inference_mode():
            unc = self.uncertainty(torch.from_numpy(a)).numpy()
        return {"anomaly": a, "uncertainty": unc, "spread": np.zeros_like(a), **rough}

    def aligned_anomaly(self, x: np.ndarray) -> np.ndarray | None:
        """Anomaly map (output stride) of a whole normalised image of the aligned part the
        detector also models per position (:mod:`models.gaussian`): the mean of its models'
        maps at each zoom. None for any other image (another shape, or no position model),
        which the bank alone scores."""
        if not self.position or tuple(x.shape) != tuple(self.position[0].image_shape):
            return None
        previous = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            with torch.inference_mode():
                maps = [pm.output_map(pm.anomaly(features_of(zoomed(x, pm.zoom))[None]),
                                      self.output_stride) for pm in self.position]
                a = torch.stack(maps).mean(dim=0)[0]
        finally:
            torch.set_num_threads(previous)
        return a.contiguous().numpy()

    def predict_image(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Maps of one raw image of any size (padded by reflection to a multiple of 4)."""
        return self.predict_image_normalized(self.normalize(image))

    def predict_image_normalized(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Maps of one normalised image of any size (see :meth:`predict_image`), with the
        32 px of mirrored context that inspection gives an image that fits one window."""
        s = self.output_stride
        h, w = x.shape
        xp, k = self._with_context(x)
        maps = self.predict(xp[None])
        return {name: v[0, k : k + -(-h // s), k : k + -(-w // s)] for name, v in maps.items()}

    def _with_context(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """``x`` with 32 px of mirrored context (and its far sides to a multiple of the output
        stride), and where the image's first map pixel lies in the padded image's maps."""
        s, m = self.output_stride, SMALL_IMAGE_CONTEXT_PX
        h, w = x.shape
        # mirrored about the border pixel, as the bank's images (features_of) and inspection's
        # windows (scanner.inspection.tiled) are: mirrored with the border pixel repeated
        # ("symmetric"), a texture's border cells scored 10-20 x their distance in the bank,
        # and the default's thresholds were calibrated on those
        return _window(x, -m, -m, h + 2 * m + (-h) % s, w + 2 * m + (-w) % s), m // s


def features_of(image: np.ndarray) -> torch.Tensor:
    """Pretrained features ``(D, ceil(H/8), ceil(W/8))`` of a relative-reflectance image,
    computed as inspection computes them: one window with 32 px of mirrored context for an
    image that fits a window, else windows of ``CORE_PX`` with ``CONTEXT_PX`` of real context
    (mirrored beyond the image)."""
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape
    big = max(h, w) > CORE_PX
    ctx = CONTEXT_PX if big else SMALL_IMAGE_CONTEXT_PX
    core = CORE_PX if big else max(h, w)
    out = torch.zeros(FEATURE_DIM, -(-h // FEATURE_STRIDE), -(-w // FEATURE_STRIDE))
    for r0 in range(0, h, core):
        for c0 in range(0, w, core):
            hh, ww = min(core, h - r0), min(core, w - c0)
            win = _window(img, r0 - ctx, c0 - ctx, hh + 2 * ctx, ww + 2 * ctx)
            f = extract(torch.from_numpy(win)[None, None])[0]
            k = ctx // FEATURE_STRIDE
            fh, fw = -(-hh // FEATURE_STRIDE), -(-ww // FEATURE_STRIDE)
            out[:, r0 // FEATURE_STRIDE : r0 // FEATURE_STRIDE + fh,
                c0 // FEATURE_STRIDE : c0 // FEATURE_STRIDE + fw] = f[:, k : k + fh, k : k + fw]
    return out


def _window(img: np.ndarray, r0: int, c0: int, h: int, w: int) -> np.ndarray:
    """``img[r0:r0+h, c0:c0+w]`` mirrored beyond its borders, sides padded to multiples of 16."""
    h_pad, w_pad = h + (-h) % PAD_MULTIPLE, w + (-w) % PAD_MULTIPLE
    H, W = img.shape  # noqa: N806
    a0, a1, b0, b1 = max(r0, 0), min(r0 + h_pad, H), max(c0, 0), min(c0 + w_pad, W)
    block = img[a0:a1, b0:b1]
    pads = ((a0 - r0, r0 + h_pad - a1), (b0 - c0, c0 + w_pad - b1))
    mode = "reflect" if all(p < n for pair, n in zip(pads, block.shape, strict=True)
                            for p in pair) else "symmetric"
    while any(p >= n for pair, n in zip(pads, block.shape, strict=True) for p in pair):
        # an image smaller than its context: mirror in steps no longer than it
        step = tuple((min(p0, n - 1), min(p1, n - 1)) for (p0, p1), n in
                     zip(pads, block.shape, strict=True))
        block = np.pad(block, step, mode="symmetric")
        pads = tuple((p0 - s0, p1 - s1) for (p0, p1), (s0, s1) in
                     zip(pads, step, strict=True))
    return np.ascontiguousarray(np.pad(block, pads, mode=mode), dtype=np.float32)


def companion_network(net: InspectionNet | None, card: dict[str, Any]) -> InspectionModel | None:
    """The roughness network beside a detector, as an inference model (None without one)."""
    if net is None:
        return None
    return InspectionModel(net, dict(card.get("companion", {})))


# ---------------------------------------------------------------------- save / load


def save_detector(bank: torch.Tensor, card: dict[str, Any], path: str | Path,
                  companion: InspectionNet | None = None,
                  position: list[PositionModel] | None = None,
                  golden: np.ndarray | None = None) -> Path:
    """Write a detector: the bank (float16), the position models' tensors (if any), the golden
    image (float16, if any) and the roughness network's in one safetensors file, the card
    beside it; returns the weights path."""
    from .backbone import backbone_record
    from .modelfile import write_model_files

    state = {"bank": bank.detach().to(torch.float16)}
    arch: dict[str, Any] = {"name": "PatchCore", "backbone": backbone_record(),
                            "bank_size": int(bank.shape[0]), "companion": None,
                            "position": None}
    if position:
        for pm in position:
            state.update({k: v.contiguous() for k, v in pm.state().items()})
        arch["position"] = position_record(position)
    if golden is not None:
        state["golden"] = torch.from_numpy(np.ascontiguousarray(golden, np.float32)).half()
        arch["golden"] = {"shape": [int(n) for n in golden.shape]}
    if companion is not None:
        state.update({f"companion.{k}": v for k, v in companion.state_dict().items()})
        arch["companion"] = {"name": "InspectionNet", **companion.config.to_dict()}
    card = dict(card)
    card.update(architecture=arch, output_stride=OUTPUT_STRIDE, context_px=CONTEXT_PX)
    return write_model_files(state, card, path)


def detector_from_files(card: dict[str, Any], state: dict[str, torch.Tensor],
                        weights: Path) -> PatchDetector:
    """A :class:`PatchDetector` from a card and its tensors (see ``load_model``).

    Raises
    ------
    InputError
        No bank, a bank of the wrong width, a backbone other than the installed one.
    """
    from .backbone import BACKBONE_SHA256, FEATURE_DIM, backbone_record, feature_precision
    from .errors import InputError
    from .modelfile import card_path_for, network_from_state

    arch = card["architecture"]
    backbone = arch.get("backbone") or {}
    if backbone.get("weights_sha256") != BACKBONE_SHA256:
        raise InputError(f"{weights}: built on backbone weights "
                         f"{str(backbone.get('weights_sha256'))[:12]}..., not the installed "
                         f"{BACKBONE_SHA256[:12]}... (rebuild it with waferscope train)")
    ours = backbone_record()
    if [backbone.get(k) for k in ("layers", "layer_weights")] != \
            [ours["layers"], ours["layer_weights"]]:
        raise InputError(f"{weights}: built on other backbone features (layers "
                         f"{backbone.get('layers')}); rebuild it with waferscope train")
    for key in ("feature_stride", "feature_dim"):  # (cards before them lack them)
        if key in backbone and backbone[key] != ours[key]:
            raise InputError(f"{card_path_for(weights)}: architecture.backbone.{key}: "
                             f"{backbone[key]!r}, the installed backbone's is {ours[key]!r} "
                             "(an edited card, or another backbone's model)")
    built, here = backbone.get("precision", "float32"), feature_precision()
    if built != here:
        # features differ by about 3 % between the two precisions: scores shift a little
        logging.getLogger(__name__).warning(
            "%s: built on %s features, this machine computes %s ones (scores may shift by a "
            "few per cent; rebuild here or set WAFERSCOPE_FEATURE_PRECISION=%s)",
            weights, built, here, built)
    bank = state.get("bank")
    if bank is None or bank.ndim != 2 or bank.shape[1] != FEATURE_DIM or not len(bank):
        raise InputError(f"{weights}: no memory bank of {FEATURE_DIM} features in the file")
    if not torch.isfinite(bank).all():
        raise InputError(f"{weights}: the memory bank holds non-finite values (corrupt file)")
    net = None
    if arch.get("companion"):
        prefix = "companion."
        net = network_from_state(arch["companion"], {k[len(prefix):]: v for k, v in
                                                     state.items() if k.startswith(prefix)},
                                 weights)
    position = None
    if arch.get("position"):
        try:
            position = position_from_state(arch["position"], state)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise InputError(f"{weights}: position model incomplete ({exc}); rebuild it "
                             "with waferscope train") from None
    golden = None
    if arch.get("golden"):
        g = state.get("golden")
        if g is None or g.ndim != 2 or list(g.shape) != list(arch["golden"].get("shape", [])) \
                or not torch.isfinite(g).all():
            raise InputError(f"{weights}: golden image missing or damaged (corrupt file); "
                             "rebuild it with waferscope train")
        golden = g.float().numpy()
    return PatchDetector(bank, card, companion_network(net, card), path=weights,
                         position=position, golden=golden)
