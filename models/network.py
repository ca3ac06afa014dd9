"""The inspection network: a compact strided CNN with anomaly, roughness and uncertainty heads.

Design for throughput on a CPU (the product target is >= 5 megapixels/s end to end on two cores):

- the input is folded into 4 x 4 blocks (``PixelUnshuffle``), so the first convolution already
  runs at 1/4 resolution and acts as a learned 12 x 12 filter bank with stride 4: no full-resolution
  feature map is ever stored;
- a small U-Net: encoder to 1/16 (large context for stains and missing pattern), decoder back
  to 1/4 where the heads sit (output stride 4);
- ``K`` light anomaly heads (1x1 convolutions) share the decoder features; their spread is the
  uncertainty (a multi-head ensemble: one backbone pass, ``K`` cheap heads);
- the roughness head predicts a mean Sa and a log-variance (heteroscedastic regression).

About 1.6 k multiply-accumulates per input pixel with the default widths
(:func:`macs_per_pixel` counts them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import nn


@dataclass(frozen=True)
class NetConfig:
    """Architecture of :class:`InspectionNet` (stored in the model card).

    Attributes
    ----------
    widths : tuple of int
        Channels at 1/4, 1/8 and 1/16 resolution.
    heads : int
        Anomaly heads of the ensemble.
    head_hidden : int
        Hidden channels of each anomaly head.
    dropout : float
        Dropout on the shared features before the heads (training; MC dropout at test time
        when asked for).
    """

    widths: tuple[int, int, int] = (16, 32, 64)
    heads: int = 4
    head_hidden: int = 16
    dropout: float = 0.1

    def to_dict(self) -> dict:
        """JSON-serialisable dict."""
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NetConfig:
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        d = dict(d)
        if "widths" in d:
            d["widths"] = tuple(int(w) for w in d["widths"])
        return cls(**d)


OUTPUT_STRIDE = 4


def _cbr(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class InspectionNet(nn.Module):
    """Multi-task CNN: anomaly logits (K heads), roughness mean and log-variance at stride 4.

    Input ``(N, 1, H, W)`` normalised images, ``H`` and ``W`` multiples of 4. Output dict:
    ``anomaly_logits`` ``(N, K, H/4, W/4)``, ``roughness`` and ``roughness_logvar``
    ``(N, 1, H/4, W/4)``.
    """

    def __init__(self, config: NetConfig | None = None) -> None:
        super().__init__()
        self.config = config or NetConfig()
        c1, c2, c3 = self.config.widths
        self.unshuffle = nn.PixelUnshuffle(OUTPUT_STRIDE)
        self.enc1 = nn.Sequential(_cbr(OUTPUT_STRIDE**2, c1), _cbr(c1, c1))  # 1/4
        self.enc2 = nn.Sequential(_cbr(c1, c2, stride=2), _cbr(c2, c2))  # 1/8
        self.enc3 = nn.Sequential(_cbr(c2, c3, stride=2), _cbr(c3, c3, dilation=2))  # 1/16
        # FPN-style top-down path: project the coarse map (cheap, at low resolution), upsample,
        # add (a concatenation would copy the fine map, and memory traffic dominates on a CPU)
        self.lat2 = nn.Conv2d(c3, c2, 1)
        self.dec2 = _cbr(c2, c2)
        self.lat1 = nn.Conv2d(c2, c1, 1)
        self.dec1 = _cbr(c1, c1)
        self.drop = nn.Dropout2d(self.config.dropout)
        k, h = self.config.heads, self.config.head_hidden
        # K heads as grouped 1x1 convolutions: one kernel call for the whole ensemble
        self.anomaly_hidden = nn.Conv2d(c1, k * h, 1)
        self.anomaly_out = nn.Conv2d(k * h, k, 1, groups=k)
        self.rough_hidden = nn.Conv2d(c1, h, 1)
        self.rough_out = nn.Conv2d(h, 2, 1)
        self.mc_dropout = False  # keep dropout active at inference (MC dropout evaluation)
        # defects are rare: start the anomaly heads at a prior of 2 % (RetinaNet's prior
        # initialisation), so the first steps do not spend themselves unlearning p = 0.5
        nn.init.constant_(self.anomaly_out.bias, -4.0)
        nn.init.normal_(self.anomaly_out.weight, std=0.01)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Shared decoder features at stride 4."""
        f1 = self.enc1(self.unshuffle(x))
        f2 = self.enc2(f1)
        f3 = self.enc3(f2)
        up = F.interpolate(self.lat2(f3), size=f2.shape[-2:], mode="bilinear",
                           align_corners=False)
        d2 = self.dec2(f2 + up)
        up = F.interpolate(self.lat1(d2), size=f1.shape[-2:], mode="bilinear",
                           align_corners=False)
        return self.dec1(f1 + up)

    def heads(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Apply the heads to shared features."""
        if self.mc_dropout:
            feat = F.dropout2d(feat, self.config.dropout, training=True)
        else:
            feat = self.drop(feat)
        logits = self.anomaly_out(F.relu(self.anomaly_hidden(feat)))
        return {"anomaly_logits": logits, **self.roughness_heads(feat)}

    def roughness_heads(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The roughness head alone on shared features (after :meth:`heads`' dropout):
        ``roughness`` and ``roughness_logvar``, as :meth:`heads` gives them."""
        r = self.rough_out(F.relu(self.rough_hidden(feat)))
        # softplus keeps Sa positive; log-variance clamped for a stable Gaussian NLL
        return {
            "roughness": F.softplus(r[:, :1]) * 10.0,
            "roughness_logvar": r[:, 1:].clamp(-8.0, 8.0),
        }

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the network (see the class docstring)."""
        return self.heads(self.features(x))


def receptive_field_px() -> int:
    """Theoretical receptive field (input pixels) of the heads.

    At stride 4: the folded 3x3 (12 px) + 3x3 (8 px more); at 1/8: 2 x 3x3 (16 + 16); at 1/16:
    3x3 (32) + dilated 3x3 (64); decoder 3x3 at 1/8 (16) and 1/4 (8), plus interpolation.
    """
    return 12 + 8 + 16 + 16 + 32 + 64 + 16 + 8 + 16


def macs_per_pixel(config: NetConfig | None = None) -> float:
    """Multiply-accumulates per input pixel of one forward pass (convolutions only)."""
    c = config or NetConfig()
    c1, c2, c3 = c.widths
    k, h = c.heads, c.head_hidden
    s4, s8, s16 = 1 / 16, 1 / 64, 1 / 256
    return (
        9 * 16 * c1 * s4 + 9 * c1 * c1 * s4  # enc1
        + 9 * c1 * c2 * s8 + 9 * c2 * c2 * s8  # enc2
        + 9 * c2 * c3 * s16 + 9 * c3 * c3 * s16  # enc3
        + c3 * c2 * s16 + 9 * c2 * c2 * s8  # lat2, dec2
        + c2 * c1 * s8 + 9 * c1 * c1 * s4  # lat1, dec1
        + (c1 * k * h + k * h + c1 * h + 2 * h) * s4  # heads
    )


def fuse_batchnorm(net: InspectionNet) -> nn.Module:
    """Fold every eval-mode BatchNorm into the convolution before it (faster inference).

    Returns the same module with each ``Conv2d, BatchNorm2d`` pair replaced by one biased
    ``Conv2d`` (and the BatchNorm by ``Identity``); use only for inference.
    """
    net.eval()
    for module in list(net.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.children())
        for i in range(len(children) - 1):
            conv, bn = children[i], children[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                module[i] = fused
                module[i + 1] = nn.Identity()
    return net


def context_margin_px() -> int:
    """Margin (input px) a window needs on each side: half the receptive field, rounded up to
    a multiple of 16 (the coarsest stride, so windows stay aligned with the 1/16 grid)."""
    half = (receptive_field_px() + 1) // 2
    return -(-half // 16) * 16
