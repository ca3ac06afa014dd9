"""A trained inspection model: network weights (safetensors) plus its JSON card.

A model is two files side by side: ``NAME.safetensors`` (tensors only; never pickle, which can
run code when loaded) and ``NAME.json`` (the card: architecture, normalisation, pixel size,
calibrated threshold, training summary, metrics, sha256 of the weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from .card import CARD_VERSION, ModelCard
from .errors import InputError as UserError
from .network import OUTPUT_STRIDE, InspectionNet, NetConfig, context_margin_px, fuse_batchnorm

#: images are divided by a robust brightness level, then ``(x / level - 1) * GAIN``
GAIN = 2.0


def default_model_path() -> Path:
    """The shipped default model (``models/default.safetensors``): the one-class detector
    built by ``python -m models.build_default``."""
    return Path(__file__).resolve().parent / "default.safetensors"


def network_model_path() -> Path:
    """The shipped network (``models/network.safetensors``) trained by ``python -m
    models.train_default`` on simulated data: the roughness and uncertainty network the
    default detector carries beside its bank (and the former default inspection model)."""
    return Path(__file__).resolve().parent / "network.safetensors"


def card_path_for(weights: Path) -> Path:
    """The JSON card that belongs to a weights file (same stem, ``.json``)."""
    return Path(weights).with_suffix(".json")


def to_luminance(image: np.ndarray) -> np.ndarray:
    """Grayscale view of an image: RGB(A) in the last axis becomes Rec. 709 luminance.

    A 2-D image is returned as float32 unchanged; ``(..., 3)`` or ``(..., 4)`` images are
    converted with ``skimage.color.rgb2gray`` (alpha dropped).
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        from skimage.color import rgb2gray

        return rgb2gray(a[..., :3].astype(np.float32)).astype(np.float32)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale or (H, W, 3|4) colour image, got {a.shape}")
    return a.astype(np.float32, copy=False)


def brightness_level(image: np.ndarray, max_samples: int = 1_000_000) -> float:
    """Robust brightness level of an image: the median of its pixels (subsampled when large).

    Any dtype; colour images are reduced to luminance first. A blank image (level 0) gives 1.
    """
    lum = to_luminance(image)
    step = max(1, int(np.sqrt(lum.size / max_samples)))
    level = float(np.median(lum[::step, ::step]))
    return level if level > 0 else 1.0


def normalize_image(image: np.ndarray, level: float | None = None) -> np.ndarray:
    """Network input from raw counts: ``(x / level - 1) * GAIN`` as float32.

    Dividing by the brightness level makes the input independent of bit depth, exposure and
    illumination while keeping contrast relative to the surface (what defects and roughness
    change). ``level`` defaults to :func:`brightness_level` of ``image`` itself (per image).
    """
    lum = to_luminance(image)
    if level is None:
        level = brightness_level(lum)
    return ((lum * np.float32(1.0 / level) - np.float32(1.0)) * np.float32(GAIN)).astype(
        np.float32, copy=False
    )


class InspectionModel:
    """A trained network with its card, ready for inference.

    Attributes
    ----------
    card : dict
        The JSON card.
    output_stride : int
        Output maps are ``1 / output_stride`` of the input resolution.
    context_px : int
        Margin (input pixels) a window needs on each side for output free of border effects.
    pixel_size_um : float
        Pixel size the model was trained at.
    pixel_size_range_um : tuple of float
        Pixel sizes it was trained over (the default model is trained multi-scale, 0.5 to
        40 µm: use it at the scan's own pixel size, without resampling, anywhere in this
        range; a model trained on a user's images has ``(p, p)``).
    threshold : float
        Calibrated decision threshold on the ``anomaly`` map.
    num_threads : int
        Torch threads used by :meth:`predict` (default: all cores of this machine).
    """

    def __init__(self, net: InspectionNet, card: dict[str, Any], path: Path | None = None) -> None:
        self.card = card
        self.path = path
        self.config = net.config
        self.output_stride = OUTPUT_STRIDE
        self.context_px = int(card.get("context_px", context_margin_px()))
        self.pixel_size_um = float(card.get("pixel_size_um", 1.0))
        lo, hi = card.get("pixel_size_range_um", [self.pixel_size_um, self.pixel_size_um])
        self.pixel_size_range_um = (float(lo), float(hi))
        self.threshold = float(card.get("threshold", 0.5))
        self.num_threads = max(1, os.cpu_count() or 1)
        self._net = fuse_batchnorm(net).to(memory_format=torch.channels_last)
        self._net.eval()

    def accepts_pixel_size(self, pixel_size_um: float, tolerance: float = 0.25) -> bool:
        """Whether images at this pixel size can be inspected as they are (no resampling):
        inside ``pixel_size_range_um`` widened by ``tolerance`` (relative)."""
        lo, hi = self.pixel_size_range_um
        return lo * (1 - tolerance) <= pixel_size_um <= hi * (1 + tolerance)

    # ------------------------------------------------------------------ pre-processing

    def brightness_level(self, image: np.ndarray) -> float:
        """Robust level (median) of an image or a subsample of a mosaic; see ``normalize``."""
        return brightness_level(image)

    def normalize(self, image: np.ndarray, level: float | None = None) -> np.ndarray:
        """Raw camera counts (any dtype, grayscale or RGB) to float32 network input.

        Per image by default: the image is divided by its own median brightness. For a mosaic
        cut into windows pass one ``level`` for all windows (``brightness_level`` of a
        subsample of the whole mosaic), so that the windows agree and no seam appears.
        Colour images are converted to luminance here.
        """
        return normalize_image(image, level)

    # ------------------------------------------------------------------ inference

    def predict(self, batch: np.ndarray, mc_samples: int = 0, margin: int = 0
                ) -> dict[str, np.ndarray]:
        """Anomaly, roughness and uncertainty maps of a batch of normalised images.

        Parameters
        ----------
        batch : ndarray, shape (N, H, W)
            float32 output of :meth:`normalize`; ``H`` and ``W`` multiples of
            ``output_stride``.
        mc_samples : int
            0 (default): the head ensemble's probabilities. > 0: Monte-Carlo dropout with this
            many passes of the heads (for the comparison in docs/model.md).
        margin : int
            Map pixels along each side the caller drops; accepted for the ``Model`` protocol
            (the network's heads cost little beside its features, which need the context),
            every pixel is computed.

        Returns
        -------
        dict of ndarray float32, each (N, H/s, W/s)
            ``anomaly``: probability that the pixel is defective (0..1, higher = more
            defective), the mean over the ensemble; ``uncertainty``: entropy (bits, 0..1) of
            that mean probability, the ensemble's total predictive uncertainty;
            ``spread``: standard deviation of the probability across the ensemble (its
            disagreement alone); ``roughness``: areal roughness Sa in nm;
            ``roughness_sigma``: predicted standard deviation of the roughness (nm).
        """
        with self._threads(), torch.inference_mode():
            feat = self._net.features(self._tensor(batch))
            out = self._net.heads(feat)
            probs = torch.sigmoid(out["anomaly_logits"])
            if mc_samples > 0:
                self._net.mc_dropout = True
                try:
                    draws = torch.stack([
                        torch.sigmoid(self._net.heads(feat)["anomaly_logits"]).mean(1)
                        for _ in range(mc_samples)
                    ])
                finally:
                    self._net.mc_dropout = False
                mean, spread = draws.mean(0), draws.std(0)
            else:
                mean, spread = probs.mean(1), probs.std(1)
            result = {
                "anomaly": mean,
                "roughness": out["roughness"][:, 0],
                "uncertainty": predictive_entropy(mean),
                "spread": spread,
                "roughness_sigma": torch.exp(0.5 * out["roughness_logvar"][:, 0]),
            }
            return {k: v.float().contiguous().numpy() for k, v in result.items()}

    def predict_roughness(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """``roughness`` and ``roughness_sigma`` of :meth:`predict` alone (the same values):
        the anomaly heads, their ensemble statistics and entropy are not computed (a
        detector's companion network gives only its roughness)."""
        with self._threads(), torch.inference_mode():
            # the heads' dropout (identity at inference), as predict's heads apply it
            feat = self._net.drop(self._net.features(self._tensor(batch)))
            out = self._net.roughness_heads(feat)
            result = {"roughness": out["roughness"][:, 0],
                      "roughness_sigma": torch.exp(0.5 * out["roughness_logvar"][:, 0])}
            return {k: v.float().contiguous().numpy() for k, v in result.items()}

    def _tensor(self, batch: np.ndarray) -> torch.Tensor:
        """A batch ``(N, H, W)`` (or one ``(H, W)`` image) as the network's input tensor."""
        x = np.asarray(batch, dtype=np.float32)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3:
            raise ValueError(f"batch must be (N, H, W), got {x.shape}")
        s = self.output_stride
        if x.shape[1] % s or x.shape[2] % s:
            raise ValueError(f"H and W must be multiples of {s}, got {x.shape[1:]}")
        t = torch.from_numpy(np.ascontiguousarray(x))[:, None]
        return t.contiguous(memory_format=torch.channels_last)

    @contextmanager
    def _threads(self) -> Iterator[None]:
        """torch on :attr:`num_threads` threads while inside, its own count after."""
        previous = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def predict_image(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Maps of one raw image of any size (padded by reflection to a multiple of 4).

        Convenience for plain images and training; mosaics go through tiled inference.
        Returns (H/s, W/s) maps (rounded up).
        """
        x = self.normalize(image)
        s = self.output_stride
        h, w = x.shape
        ph, pw = (-h) % s, (-w) % s
        if ph or pw:
            x = np.pad(x, ((0, ph), (0, pw)), mode="reflect")
        return {k: v[0] for k, v in self.predict(x[None]).items()}


# ---------------------------------------------------------------------- save / load


def _weights_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def predictive_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of a Bernoulli probability (0 when certain, 1 at p = 0.5).

    The uncertainty of a deep ensemble (Lakshminarayanan et al., 2017) is the entropy of its
    mean prediction: it is the total of the heads' own uncertainty and their disagreement
    (the mutual information), and for a calibrated model it grows with the expected error.
    The disagreement alone (``spread``) misses confident mistakes and measured worse
    (docs/model.md).
    """
    q = p.clamp(1e-6, 1 - 1e-6)
    return -(q * torch.log2(q) + (1 - q) * torch.log2(1 - q))


def save_model(net: InspectionNet, card: dict[str, Any], path: str | Path) -> Path:
    """Write ``path`` (.safetensors) and its card (.json) atomically; returns the weights path.

    The card gets ``version``, ``architecture``, ``output_stride``, ``context_px`` and the
    ``weights_sha256`` of the file written.
    """
    card = dict(card)
    card.update(architecture={"name": "InspectionNet", **net.config.to_dict()},
                output_stride=OUTPUT_STRIDE, context_px=context_margin_px())
    return write_model_files(net.state_dict(), card, path)


def write_model_files(state: dict[str, torch.Tensor], card: dict[str, Any],
                      path: str | Path) -> Path:
    """Write tensors (.safetensors) and card (.json) atomically; returns the weights path.

    The card gets ``version``, ``weights_file`` and the ``weights_sha256`` of the file written.
    """
    from safetensors.torch import save_file

    path = weights_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "card_version": str(CARD_VERSION)})
    card = dict(card)
    card.update(version=CARD_VERSION, weights_file=path.name, weights_sha256=_weights_sha256(tmp))
    card_tmp = card_path_for(path).with_name(card_path_for(path).name + ".tmp")
    card_tmp.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    # safetensors writes its file for the owner only; a model is shared like its card
    shutil.copymode(card_tmp, tmp)
    tmp.replace(path)
    card_tmp.replace(card_path_for(path))
    return path


def load_model(path: str | Path | None = None) -> Any:
    """Load a model (weights + card) for inference; ``None`` loads the shipped default.

    ``path`` may name the ``.safetensors`` file, the ``.json`` card, or the common stem. A
    detector card (architecture ``PatchCore``) gives a :class:`models.detector.PatchDetector`,
    a network card an :class:`InspectionModel`.

    Raises
    ------
    UserError
        Missing file, corrupt weights, a card that does not match the weights (sha256,
        architecture), naming the file.
    """
    card, state, weights = read_model_files(path)
    if card["architecture"].get("name") == "PatchCore":
        from .detector import detector_from_files

        return detector_from_files(card, state, weights)
    return InspectionModel(network_from_state(card["architecture"], state, weights), card,
                           path=weights)


def load_network(path: str | Path | None = None) -> tuple[InspectionNet, dict[str, Any], Path]:
    """The trainable network of a saved model (not fused for inference), its card and file.

    ``path`` as for :func:`load_model`; a detector's roughness network is taken from it.

    Raises
    ------
    UserError
        Missing file, corrupt weights, a card that does not match the weights (sha256,
        architecture), naming the file.
    """
    card, state, weights = read_model_files(path)
    arch = card["architecture"]
    if arch.get("name") == "PatchCore":
        if not arch.get("companion"):
            raise UserError(f"{weights}: this detector has no roughness network")
        prefix = "companion."
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        arch = arch["companion"]
    return network_from_state(arch, state, weights), card, weights


def weights_path(path: str | Path) -> Path:
    """The ``.safetensors`` file a model path names, for writing and reading alike: the path
    itself, its card's (``.json``) weights, or the path with ``.safetensors`` appended (a name
    with a dot, ``coupon_v1.2``, keeps it: the model written is the one read back). A path
    with no name of its own (``.``, ``sub/..``) is taken whole first: it names a folder, which
    the readers refuse as such (it failed with "PosixPath('.') has an empty name")."""
    weights = Path(path)
    if weights.name in ("", ".."):
        weights = Path(os.path.abspath(weights))
    if weights.suffix == ".json":
        return weights.with_suffix(".safetensors")
    if weights.suffix != ".safetensors":
        return weights.with_name(weights.name + ".safetensors")
    return weights


def resolve_model_path(path: str | Path | None) -> Path:
    """The ``.safetensors`` file a model path names (None: the shipped default)."""
    return default_model_path() if path is None else weights_path(path)


def read_model_files(path: str | Path | None) -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                                        Path]:
    """The card, the tensors and the weights file of a saved model (checked against the card).

    Raises
    ------
    UserError
        Missing file, unreadable card, corrupt weights, a checksum that does not match.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = resolve_model_path(path)
    card_file = card_path_for(weights)
    given = Path(path) if path is not None else weights
    if given.is_dir():  # named as given, not as the DIR.safetensors looked for
        raise UserError(f"{given}: a folder, not a model (give the .safetensors file "
                        "`waferscope train` wrote, or its .json card)")
    if given.is_file() and given.suffix.lower() not in (".safetensors", ".json"):
        # an image or another file given as the model: named as given (the name looked
        # for, base.png.safetensors, was one the user never typed)
        raise UserError(f"{given}: not a model (give the .safetensors file `waferscope train` "
                        "wrote, or its .json card)")
    for f in (weights, card_file):
        if not f.is_file():
            raise UserError(f"{f}: model file not found")
    try:
        card = json.loads(card_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{card_file}: not a valid model card ({exc})") from None
    if not isinstance(card, dict) or not isinstance(card.get("architecture"), dict):
        raise UserError(f"{card_file}: not a waferscope model card (no 'architecture')")
    version = card.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > CARD_VERSION:
        # pydantic's "Input should be less than or equal to 1" said not what to do
        raise UserError(f"{card_file}: version: {version}, a card of a later waferscope (this "
                        f"one reads up to version {CARD_VERSION}); upgrade waferscope to use it")
    try:
        ModelCard.model_validate(card)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserError(f"{card_file}: {'.'.join(str(p) for p in err['loc'])}: "
                        f"{err['msg']}") from None
    if card["architecture"].get("name") == "PatchCore":
        # every detector is built calibrated: this card was edited (without its score scale,
        # raw distances were compared with the threshold: a score of 143 where 1.7 was due)
        for key, what in (("threshold", "the model's calibrated decision threshold"),
                          ("score_reference", "the scale of its scores")):
            if card.get(key) is None:
                raise UserError(f"{card_file}: {key}: missing ({what})")
    expected = card.get("weights_sha256")
    if not expected:  # every model is written with it: without it, damage goes unseen
        raise UserError(f"{card_file}: weights_sha256: missing (the checksum of "
                        f"{weights.name}; the card was edited)")
    if expected != _weights_sha256(weights):
        raise UserError(f"{weights}: checksum does not match its card {card_file.name} "
                        "(corrupt or replaced weights)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{weights}: corrupt model weights ({exc})") from None
    return card, state, weights


def network_from_state(arch: dict[str, Any], state: dict[str, torch.Tensor],
                       weights: Path) -> InspectionNet:
    """An :class:`InspectionNet` of an architecture record with its tensors (checked)."""
    try:
        net = InspectionNet(NetConfig.from_dict({k: v for k, v in arch.items() if k != "name"}))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{card_path_for(weights)}: unknown architecture ({exc})") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "mismatch"
        raise UserError(
            f"{weights}: weights do not fit the card's architecture ({first})"
        ) from None
    return net
