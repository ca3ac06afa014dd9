"""A model's JSON card as one typed record, with the look-ups inspection needs.

The card travels beside the weights (``NAME.json`` beside ``NAME.safetensors``): what the
model is (``architecture``), the pixel sizes it runs at, and the thresholds calibrated on
held-out good images: pooled (``threshold``), per recipe sample kind, per band of pixel
sizes, and per neighbourhood context (quiet, plain, plain near structure). Every card read
is validated against :class:`ModelCard` (``models.modelfile.read_model_files``), so a card
with a field of the wrong type is refused naming it; keys it does not describe (provenance,
training history) are kept as they are.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .thresholds import CONTEXT_CARD_KEYS

#: a decision threshold: a positive and finite number (NaN would flag nothing, and say nothing;
#: strict, so that an edited card's ``"1.2"`` or ``true`` is refused rather than read as one)
Threshold = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]


class PixelBand(BaseModel):
    """Thresholds of one sample kind over a band of pixel sizes."""

    model_config = ConfigDict(extra="allow")

    pixel_size_um: tuple[float, float]
    threshold: Threshold
    quiet: Threshold | None = None
    plain: Threshold | None = None
    plain_near_structure: Threshold | None = None
    line: Threshold | None = Field(None, description="line threshold (models.lines)")
    good_scores: dict[str, Any] | None = Field(
        None, description="held-out good-surface scores of the band (models.drift."
                          "score_summary), what drift compares one scan with")

    def context(self, name: str) -> float | None:
        """The band's threshold for a neighbourhood context (None: none)."""
        return getattr(self, name, None)


class DieToDieCalibration(BaseModel):
    """The die-to-die comparison calibrated on good scans of a patterned product, or what
    good image files of it showed (whether their dies repeat; no z threshold: a file's dies
    agree far better than a scan's)."""

    model_config = ConfigDict(extra="allow")

    good_max_z: float = Field(ge=0, description="largest z-score the good scans' dies reach")
    dies: int = Field(ge=0, description="dies compared on the good scans")
    scans: int | None = Field(None, ge=0)
    z_threshold: Threshold | None = Field(
        None, description="z-score that counts as a defect (none: inspection's default)")
    source: str | None = Field(None, description="the good image file judged (not scans)")
    texture_good_max_z: float | None = Field(
        None, ge=0, description="largest texture z-score (fine-detail energy) they reach")
    texture_z_threshold: Threshold | None = Field(
        None, description="texture z-score that counts as a defect")
    found_grid_repeats: bool | None = Field(
        None, description="false: the repeat found in the good scans is no layout (their "
                          "'dies' differ beyond any threshold); inspection leaves it")


#: version of the card format (a card of a later one, written by a newer waferscope, may mean
#: what this one cannot read: refused, not guessed at)
CARD_VERSION = 1
#: relative difference of pixel sizes past which a card is said not to fit a source
PIXEL_SIZE_SLACK = 0.15


def within_pixel_sizes(pixel_size_um: float, lo: float, hi: float) -> bool:
    """Whether a pixel size lies in ``[lo, hi]`` widened by :data:`PIXEL_SIZE_SLACK`."""
    return lo / (1 + PIXEL_SIZE_SLACK) <= pixel_size_um <= hi * (1 + PIXEL_SIZE_SLACK)


class ModelCard(BaseModel):
    """The top level of a model card (see the module docstring)."""

    model_config = ConfigDict(extra="allow")

    version: int | None = Field(None, ge=1, le=CARD_VERSION,
                                description="card format (this waferscope reads up to "
                                            f"{CARD_VERSION})")

    architecture: dict[str, Any] = Field(description="what the weights are: detector "
                                         "(PatchCore) or network, and their layout")
    kind: Literal["detector", "network"] | None = Field(None, description="what was built")
    threshold: Threshold | None = Field(None, description="pooled decision threshold")
    line_threshold: Threshold | None = Field(
        None, description="pooled threshold of the line evidence (models.lines; None: "
                                "none)")
    pixel_size_um: float | None = Field(None, gt=0)
    pixel_size_range_um: tuple[float, float] | None = None
    pixel_size_assumed: bool | None = Field(
        None, description="true: the good images were files with no pixel size and none was "
                          "given, so pixel_size_um is an assumption (1 um)")
    output_stride: int | None = Field(None, gt=0)
    context_px: int | None = Field(None, ge=0)
    weights_sha256: str | None = None
    score_reference: float | None = Field(None, gt=0)
    uncertainty_log_scale: float | None = Field(None, gt=0)
    thresholds_by_sample_kind: dict[str, Threshold] = Field(default_factory=dict)
    thresholds_by_pixel_size: dict[str, list[PixelBand]] = Field(default_factory=dict)
    thresholds_line_by_sample_kind: dict[str, Threshold] = Field(default_factory=dict)
    good_scores_by_sample_kind: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="held-out good-surface scores per sample kind, "
                                          "beside thresholds_by_sample_kind")
    thresholds_quiet_by_sample_kind: dict[str, Threshold] = Field(default_factory=dict)
    thresholds_plain_by_sample_kind: dict[str, Threshold] = Field(default_factory=dict)
    thresholds_plain_near_structure_by_sample_kind: dict[str, Threshold] = Field(
        default_factory=dict)
    sample_edge_seen: bool | None = Field(
        None, description="whether the good images showed a sample's edge with what lies "
                          "beyond it, as a scan does (false: image files only; inspection "
                          "then leaves a band along the edge out)")
    die_to_die: DieToDieCalibration | None = Field(
        None, description="die-to-die z threshold set on the good scans (inspection's "
                          "default without it), or whether good image files' dies repeat")

    def pixel_band(self, sample_kind: str | None, pixel_size_um: float | None
                   ) -> PixelBand | None:
        """The calibration band of a kind of sample at a pixel size (None: none); a pixel
        size outside every band gets the nearest one."""
        bands = self.thresholds_by_pixel_size.get(sample_kind or "")
        if not bands or not pixel_size_um or pixel_size_um <= 0:
            return None
        for band in bands:
            lo, hi = band.pixel_size_um
            if lo <= pixel_size_um <= hi:
                return band
        return bands[0] if pixel_size_um < bands[0].pixel_size_um[0] else bands[-1]

    def pixel_size_warning(self, sample_kind: str | None, pixel_size_um: float | None
                           ) -> str | None:
        """Why this card may not fit a source at ``pixel_size_um``, in one sentence (None:
        it fits): its pixel size was assumed and the source's differs by more than 15 %, or
        the source lies more than 15 % outside every pixel band calibrated for its kind."""
        if not pixel_size_um or pixel_size_um <= 0:
            return None
        if self.pixel_size_assumed and self.pixel_size_um and \
                abs(pixel_size_um / self.pixel_size_um - 1) > PIXEL_SIZE_SLACK:
            return (f"the model was built from image files with no pixel size; it runs at "
                    f"this source's {pixel_size_um:g} um/px, as if its good images had been "
                    f"taken so (if not, rebuild it with their --pixel-size)")
        bands = self.thresholds_by_pixel_size.get(sample_kind or "")
        if bands:
            lo, hi = bands[0].pixel_size_um[0], bands[-1].pixel_size_um[1]
            if not within_pixel_sizes(pixel_size_um, lo, hi):
                return (f"the model's thresholds for {sample_kind} were calibrated at "
                        f"{lo:g}-{hi:g} um/px; this source is at {pixel_size_um:g} um/px and "
                        f"gets the nearest band's: check its false alarms on a good part")
        return None

    def threshold_for(self, sample_kind: str | None, pixel_size_um: float | None,
                      pooled: float) -> tuple[float, str]:
        """The threshold for a kind of sample and where it comes from: its pixel band's, else
        its kind's, else ``pooled`` (the model's)."""
        band = self.pixel_band(sample_kind, pixel_size_um)
        if band is not None:
            lo, hi = band.pixel_size_um
            return band.threshold, f"model card ({sample_kind}, {lo:g}-{hi:g} um pixels)"
        if sample_kind in self.thresholds_by_sample_kind:
            return self.thresholds_by_sample_kind[sample_kind], f"model card ({sample_kind})"
        return float(pooled), "model card"

    def good_scores_for(self, sample_kind: str | None, pixel_size_um: float | None,
                        pooled: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """The held-out good-surface scores that go with :meth:`threshold_for`'s threshold
        and where they come from: its pixel band's, else its kind's, else ``pooled`` (the
        card's ``good_scores``; said as "")."""
        band = self.pixel_band(sample_kind, pixel_size_um)
        if band is not None and band.good_scores:
            lo, hi = band.pixel_size_um
            return band.good_scores, f"{sample_kind}, {lo:g}-{hi:g} um pixels"
        if sample_kind in self.good_scores_by_sample_kind:
            return self.good_scores_by_sample_kind[sample_kind], str(sample_kind)
        return pooled, ""

    def line_threshold_for(self, sample_kind: str | None, threshold_source: str,
                           pixel_size_um: float | None = None) -> float | None:
        """The line evidence's threshold (:mod:`models.lines`) that goes with
        :meth:`threshold_for`'s: its pixel band's, else its kind's, else the pooled one.
        None where the card has none or the user set the threshold (the line threshold was
        calibrated beside the card's, not the user's)."""
        if threshold_source == "user":
            return None
        band = self.pixel_band(sample_kind, pixel_size_um)
        if band is not None:
            return band.line
        if sample_kind in self.thresholds_by_sample_kind:
            return self.thresholds_line_by_sample_kind.get(sample_kind)
        return self.line_threshold

    def context_thresholds(self, sample_kind: str | None, threshold_source: str,
                           pixel_size_um: float | None = None) -> dict[str, float | None]:
        """``{"quiet": t, "plain": t, "plain_near_structure": t}`` for a kind of sample, None
        where none applies: none for the kind, or the user set the threshold (a user's
        threshold applies everywhere)."""
        band = self.pixel_band(sample_kind, pixel_size_um)
        out: dict[str, float | None] = {}
        for context, key in CONTEXT_CARD_KEYS.items():
            value = None
            if threshold_source != "user" and sample_kind:
                value = (band.context(context) if band is not None
                         else getattr(self, key).get(sample_kind))
            out[context] = float(value) if value is not None else None
        return out


def card_of(model: Any) -> ModelCard:
    """The typed card of a loaded model (its ``card`` dict; an empty card when it has none)."""
    card = getattr(model, "card", None) or {}
    if isinstance(card, ModelCard):
        return card
    return ModelCard.model_validate({"architecture": {}, **card})
