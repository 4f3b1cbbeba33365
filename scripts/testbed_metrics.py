"""Coherence testbed v2 metrics: one object, native-scale detail, halo, colour drift, speckle, clipping.

One implementation used by eval_coherence.py, train_testbed.py's checks and tests/test_testbed.py.
Every measure takes a uint8 HxWx3 picture and the prompt's colour (and shape); none knows how the
picture was made, so the trivial baseline (base size + bicubic upscale) is judged like any row.

- detail: contrast of the texture at its training period *in pixels* (testbed_common.OBJECT_PERIOD
  inside the objects, BACKGROUND_PERIOD in the background), from a log-Gabor ring filter. An
  upscaled base image carries the same texture k times coarser, outside the ring; dividing by the
  mean of 1x plain samples (of the same prompt, for objects) gives "1.0 = as detailed as native".
- halo: overshoot of the luminance in a band just outside the largest object's edge, beyond the
  background level, as a share of the object/background contrast (blur alone scores 0).
- colour drift: hue (degrees) and saturation error of the largest object against the trained colour.
- speckle: share of saturated pixels that belong to no counted object of the prompted colour.
- clipped: share of pixels with a channel at 0 or 255 (the data set stays within 1..254).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
import testbed_common as tc
from scipy import ndimage

RING_SIGMA = 0.35  # log-frequency width of the ring: an octave below the period passes at exp(-2)
OBJECT_ERODE = 2  # px trimmed inside the object so its edge's broadband step stays out
BORDER = 4  # px at the picture's border left out of background detail (FFT wrap-around)
HALO_GAP = 2  # px between the object's mask and the halo band (anti-aliased edge pixels)
SHAPE_FILL = {"triangle": 0.5, "circle": math.pi / 4, "square": 1.0}  # area / bounding-box area
_EIGHT = np.ones((3, 3), bool)


def luminance(image: np.ndarray) -> np.ndarray:
    rgb = np.asarray(image, np.float32)[..., :3] / 255.0
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def ring_filter(lum: np.ndarray, period: float) -> np.ndarray:
    """Luminance band-passed around 1/period cycles per pixel (radial log-Gabor, every orientation)."""
    h, w = lum.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    with np.errstate(divide="ignore"):
        gain = np.exp(-(np.log(np.maximum(f, 1e-9) * period) ** 2) / (2 * RING_SIGMA**2))
    gain[0, 0] = 0.0
    return np.real(np.fft.ifft2(np.fft.fft2(lum - lum.mean()) * gain))


def band_contrast(lum: np.ndarray, mask: np.ndarray, period: float) -> float:
    """RMS of the ring-filtered luminance over `mask`, over the mask's mean luminance (nan if empty)."""
    if mask.sum() < 4:
        return float("nan")
    band = ring_filter(lum, period)
    return float(np.sqrt(np.mean(band[mask] ** 2)) / max(float(lum[mask].mean()), 1e-3))


def objects_mask(image: np.ndarray, colour: str) -> tuple[np.ndarray, np.ndarray]:
    """(all counted objects, the largest one), holes filled, as boolean masks."""
    h, w = image.shape[:2]
    labels, n = ndimage.label(tc.colour_mask(image, colour), structure=_EIGHT)
    if n == 0:
        empty = np.zeros((h, w), bool)
        return empty, empty
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    keep = np.flatnonzero(sizes >= tc.min_object_area(h, w))
    counted = ndimage.binary_fill_holes(np.isin(labels, keep)) if keep.size else np.zeros((h, w), bool)
    largest = ndimage.binary_fill_holes(labels == int(np.argmax(sizes))) if keep.size else counted
    return counted, largest


def saturated(image: np.ndarray) -> np.ndarray:
    _, sat, val = tc.hsv(image)
    return (sat >= tc.MIN_SATURATION) & (val >= tc.MIN_VALUE)


def background_mask(image: np.ndarray) -> np.ndarray:
    """Pixels at least 4 px from any saturated pixel and from the border."""
    h, w = image.shape[:2]
    near = ndimage.binary_dilation(saturated(image), _EIGHT, iterations=4)
    inner = np.zeros((h, w), bool)
    inner[BORDER : h - BORDER, BORDER : w - BORDER] = True
    return inner & ~near


def object_detail(image: np.ndarray, colour: str) -> float:
    counted, _ = objects_mask(image, colour)
    core = ndimage.binary_erosion(counted, _EIGHT, iterations=OBJECT_ERODE)
    return band_contrast(luminance(image), core, tc.OBJECT_PERIOD)


def background_detail(image: np.ndarray) -> float:
    return band_contrast(luminance(image), background_mask(image), tc.BACKGROUND_PERIOD)


def halo_width(height: int, width: int) -> int:
    """Width of the band checked for halo: a few native pixels, wider on big pictures (upscaling
    rings over k pixels)."""
    return max(4, round(0.03 * min(height, width)))


def halo(image: np.ndarray, colour: str) -> float:
    """Luminance overshoot just outside the largest object, beyond the background, over the
    object/background contrast; 0 for a clean or merely blurred edge, nan without an object."""
    _, largest = objects_mask(image, colour)
    if not largest.any():
        return float("nan")
    h, w = image.shape[:2]
    bw = halo_width(h, w)
    lum = luminance(image)
    other = saturated(image) & ~ndimage.binary_dilation(largest, _EIGHT, iterations=HALO_GAP)
    grown = [ndimage.binary_dilation(largest, _EIGHT, iterations=i) for i in (HALO_GAP, HALO_GAP + bw,
                                                                               HALO_GAP + 2 * bw, HALO_GAP + 4 * bw)]
    band = grown[1] & ~grown[0] & ~other
    far = grown[3] & ~grown[2] & ~other
    if band.sum() < 4 or far.sum() < 4:
        return float("nan")
    obj, bg = float(lum[largest].mean()), float(lum[far].mean())
    contrast = abs(bg - obj)
    if contrast < 0.02:
        return float("nan")
    # Overshoot points away from the object: brighter than a bright background, darker than a dark one.
    return max(0.0, math.copysign(1.0, bg - obj) * (float(lum[band].mean()) - bg)) / contrast


def trained_hue_sat(colour: str) -> tuple[float, float]:
    h, s, _ = colorsys.rgb_to_hsv(*(np.asarray(tc.COLOURS[colour], float) / 255.0))
    return h * 360.0, s


def colour_drift(image: np.ndarray, colour: str) -> tuple[float, float]:
    """(|hue error| in degrees, |saturation error|) of the largest object's pixels of its colour."""
    _, largest = objects_mask(image, colour)
    sel = largest & tc.colour_mask(image, colour)
    if sel.sum() < 4:
        return float("nan"), float("nan")
    hue, sat, _ = tc.hsv(image)
    angle = np.deg2rad(hue[sel])
    mean_hue = math.degrees(math.atan2(np.sin(angle).mean(), np.cos(angle).mean()))
    want_h, want_s = trained_hue_sat(colour)
    return abs((mean_hue - want_h + 180.0) % 360.0 - 180.0), abs(float(sat[sel].mean()) - want_s)


def speckle(image: np.ndarray, colour: str) -> float:
    counted, _ = objects_mask(image, colour)
    return float((saturated(image) & ~counted).mean())


def clipped(image: np.ndarray) -> float:
    img = np.asarray(image)[..., :3]
    return float(((img == 0) | (img == 255)).any(-1).mean())


def classify_shape(mask: np.ndarray) -> str | None:
    """Shape whose bounding-box fill ratio is nearest the mask's (triangle 0.5, circle 0.79, square 1)."""
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    return min(SHAPE_FILL, key=lambda s: abs(SHAPE_FILL[s] - fill))


@dataclass(frozen=True)
class Measure:
    colour: str  # the prompt's colour and shape: detail is judged against 1x samples of the same prompt
    shape: str
    n_objects: int
    shape_ok: bool  # the largest object has the prompted shape
    object_detail: float  # raw band contrast (divide by the 1x plain reference)
    background_detail: float
    halo: float
    hue_error: float
    sat_error: float
    speckle: float
    clipped: float


def measure(image: np.ndarray, colour: str, shape: str) -> Measure:
    if shape not in SHAPE_FILL:
        raise ValueError(f"shape={shape!r} is not one of {tuple(SHAPE_FILL)}")
    _, largest = objects_mask(image, colour)
    hue_err, sat_err = colour_drift(image, colour)
    return Measure(
        colour=colour,
        shape=shape,
        n_objects=tc.count_objects(image, colour).n_objects,
        shape_ok=classify_shape(largest) == shape,
        object_detail=object_detail(image, colour),
        background_detail=background_detail(image),
        halo=halo(image, colour),
        hue_error=hue_err,
        sat_error=sat_err,
        speckle=speckle(image, colour),
        clipped=clipped(image),
    )


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a share."""
    if n <= 0:
        raise ValueError(f"n={n}: need at least one trial")
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def nanmean(values) -> float:
    v = np.asarray([x for x in values if not math.isnan(x)], float)
    return float(v.mean()) if v.size else float("nan")


@dataclass(frozen=True)
class Reference:
    """Mean raw detail of 1x plain samples: what "native" means for one model.

    Object detail is kept per prompt, because the stripes' luminance contrast differs several-fold
    between colours (yellow's is a quarter of blue's): a cell holding only some prompts, as a small
    cell does, would otherwise be judged against other colours' texture."""

    object_detail: float  # over every sample: the fallback for a prompt the reference lacks
    background_detail: float
    object_by_prompt: dict[tuple[str, str], float]  # (colour, shape) -> mean raw object detail

    @classmethod
    def of(cls, measures: list[Measure]) -> Reference:
        by_prompt: dict[tuple[str, str], list[float]] = {}
        for m in measures:
            by_prompt.setdefault((m.colour, m.shape), []).append(m.object_detail)
        return cls(nanmean(m.object_detail for m in measures), nanmean(m.background_detail for m in measures),
                   {k: nanmean(v) for k, v in by_prompt.items()})

    def object_native(self, m: Measure) -> float:
        """Native raw object detail for `m`'s prompt."""
        ref = self.object_by_prompt.get((m.colour, m.shape), float("nan"))
        return ref if math.isfinite(ref) and ref > 0 else self.object_detail

    def as_dict(self) -> dict:
        return {"object_detail": self.object_detail, "background_detail": self.background_detail,
                "object_by_prompt": {f"{c} {s}": v for (c, s), v in self.object_by_prompt.items()}}


def summarise(measures: list[Measure], ref: Reference) -> dict:
    """Cell statistics: shares with Wilson intervals, means of the rest, detail relative to `ref`."""
    if not measures:
        raise ValueError("measures is empty; need at least one image to summarise")
    n = len(measures)
    one = sum(m.n_objects == 1 for m in measures)
    shape = sum(m.shape_ok for m in measures)
    return {
        "n": n,
        "one": one / n, "one_ci": wilson(one, n),
        "shape": shape / n, "shape_ci": wilson(shape, n),
        "count": float(np.mean([m.n_objects for m in measures])),
        "detail": nanmean(m.object_detail / ref.object_native(m) for m in measures),
        "detail_bg": nanmean(m.background_detail for m in measures) / ref.background_detail,
        "halo": nanmean(m.halo for m in measures),
        "hue_error": nanmean(m.hue_error for m in measures),
        "sat_error": nanmean(m.sat_error for m in measures),
        "speckle": float(np.mean([m.speckle for m in measures])),
        "clipped": float(np.mean([m.clipped for m in measures])),
    }
