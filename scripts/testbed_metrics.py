"""Coherence testbed metrics: one object, colour, native-scale detail, halo, speckle, clipping.

One implementation used by eval_coherence.py, train_testbed.py's checks and tests/test_testbed.py.
Every measure takes a uint8 HxWx3 picture and the prompt's colour (and shape); none knows how the
picture was made, so the trivial baseline (base size + bicubic upscale) is judged like any row.

- detail: contrast of the texture at its training period *in pixels* (testbed_common.OBJECT_PERIOD
  inside the objects, BACKGROUND_PERIOD in the background), from a log-Gabor ring filter applied to
  each region's own texture (the region minus its local mean, zero outside it). Filtering the
  region's texture rather than the whole picture keeps the object's edge and the other region's
  texture out of the ring: measured on the whole picture, a flat object read 0.22 of a striped one's
  power. An upscaled base image carries the texture k times coarser, outside the ring; dividing by
  the mean of 1x plain samples (of the same prompt, for objects) gives "1.0 = as detailed as native".
- stripes: the objects' texture power against drawn pictures of the same prompt (1.0 = as striped
  as the training data), so a model whose samples carry no stripes cannot score 1 against itself.
- texture retention: the share of a drawn picture's texture power a copy keeps (a VAE round trip),
  in the drawn picture's own regions.
- halo: overshoot of the luminance in a band just outside the largest object's edge, beyond the
  background level, as a share of the object/background contrast (blur alone scores 0).
- colour: whether the largest saturated object's hue is nearest the prompted colour among the
  testbed's colours, and its hue (degrees) and saturation error against the trained colour.
- speckle: share of saturated pixels that belong to no counted object of the prompted colour.
- clipped: share of pixels with a channel at 0 or 255 (the data set stays within 1..254).
- border: the largest shift, in levels of any channel, of the background's mean colour in a BORDER-px strip
  along one edge from the strip just inside it (a tinted band along an edge, which halo and clip do not see).
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import testbed_common as tc
from scipy import ndimage

RING_SIGMA = 0.35  # log-frequency width of the ring: an octave below the period passes at exp(-2)
OBJECT_ERODE = 2  # px trimmed inside the object: its anti-aliased edge is neither object nor background
BORDER = 4  # px at the picture's border left out of background detail
REGION_SMOOTH = 0.5  # sigma of a region's local mean, in texture periods: passes the texture at exp(-4.9)
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


def region_texture(lum: np.ndarray, region: np.ndarray, period: float) -> np.ndarray:
    """Ring-filtered texture of `lum` inside `region` alone: the luminance minus its local mean over the
    region (normalised convolution, so the region's edge is no step), zero outside the region."""
    inside = region.astype(np.float32)
    sigma = REGION_SMOOTH * period
    weight = ndimage.gaussian_filter(inside, sigma)
    local = ndimage.gaussian_filter(lum * inside, sigma) / np.maximum(weight, 1e-6)
    return ring_filter((lum - local) * inside, period)


def texture_power(lum: np.ndarray, region: np.ndarray, core: np.ndarray, period: float) -> float:
    """Mean square of the region's texture over `core`, over the core's mean luminance squared: the
    texture's relative power (nan if the core has under 4 pixels)."""
    if core.sum() < 4:
        return float("nan")
    tex = region_texture(lum, region, period)
    return float(np.mean(tex[core] ** 2) / max(float(lum[core].mean()), 1e-3) ** 2)


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


def clear_of_objects(image: np.ndarray) -> np.ndarray:
    """Pixels at least 4 px from any saturated pixel."""
    return ~ndimage.binary_dilation(saturated(image), _EIGHT, iterations=4)


def background_mask(image: np.ndarray) -> np.ndarray:
    """Pixels at least 4 px from any saturated pixel and from the border."""
    h, w = image.shape[:2]
    inner = np.zeros((h, w), bool)
    inner[BORDER : h - BORDER, BORDER : w - BORDER] = True
    return inner & clear_of_objects(image)


def object_regions(image: np.ndarray, colour: str) -> tuple[np.ndarray, np.ndarray]:
    """(region, core) of the counted objects: the mask without its anti-aliased rim, and that eroded
    again so the ring's reach past the region's edge (where it sees zeros) is left out."""
    counted, _ = objects_mask(image, colour)
    region = ndimage.binary_erosion(counted, _EIGHT, iterations=OBJECT_ERODE // 2)
    return region, ndimage.binary_erosion(counted, _EIGHT, iterations=OBJECT_ERODE)


def background_regions(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    region = background_mask(image)
    return region, ndimage.binary_erosion(region, _EIGHT, iterations=1)


def object_detail(image: np.ndarray, colour: str) -> float:
    """RMS relative contrast of the objects' texture at OBJECT_PERIOD (the square root of its power)."""
    return math.sqrt(texture_power(luminance(image), *object_regions(image, colour), tc.OBJECT_PERIOD))


def background_detail(image: np.ndarray) -> float:
    return math.sqrt(texture_power(luminance(image), *background_regions(image), tc.BACKGROUND_PERIOD))


def texture_retention(originals, copies, colours) -> dict:
    """Share of the drawn pictures' texture power their copies keep (e.g. through a VAE round trip),
    objects at OBJECT_PERIOD and background at BACKGROUND_PERIOD, each in the original's regions.

    `power` sums the copies' power over the originals' (noise counts as texture there); `in_phase`
    is the projection of each copy's texture on its original's (sum <copy, original> / sum
    <original, original>), which invented or shifted stripes do not earn."""
    sums = {k: np.zeros(3) for k in ("object", "background")}  # <o,o>, <c,c>, <c,o>
    for orig, copy, colour in zip(originals, copies, colours, strict=True):
        lo, lc = luminance(orig), luminance(copy)
        for key, (region, core), period in (
            ("object", object_regions(orig, colour), tc.OBJECT_PERIOD),
            ("background", background_regions(orig), tc.BACKGROUND_PERIOD),
        ):
            to, tcopy = region_texture(lo, region, period)[core], region_texture(lc, region, period)[core]
            sums[key] += (float(to @ to), float(tcopy @ tcopy), float(tcopy @ to))
    out = {}
    for key, (oo, cc, co) in sums.items():
        out[key] = cc / oo if oo > 0 else float("nan")
        out[f"{key}_in_phase"] = co / oo if oo > 0 else float("nan")
    return out


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


def largest_saturated_object(image: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of saturated pixels, whatever its hue (empty if none reaches
    the object size): the object a viewer sees, even when it has the wrong colour."""
    h, w = image.shape[:2]
    labels, n = ndimage.label(saturated(image), structure=_EIGHT)
    if n == 0:
        return np.zeros((h, w), bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    biggest = int(np.argmax(sizes))
    return labels == biggest if sizes[biggest] >= tc.min_object_area(h, w) else np.zeros((h, w), bool)


def object_hue(image: np.ndarray) -> tuple[float, float]:
    """Circular mean hue (degrees) and mean saturation of the largest saturated object (nan if none)."""
    sel = largest_saturated_object(image)
    if not sel.any():
        return float("nan"), float("nan")
    hue, sat, _ = tc.hsv(image)
    angle = np.deg2rad(hue[sel])
    return math.degrees(math.atan2(np.sin(angle).mean(), np.cos(angle).mean())) % 360.0, float(sat[sel].mean())


def hue_distance(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


def nearest_colour(hue: float) -> str | None:
    """The testbed colour whose trained hue is nearest `hue` (None for nan)."""
    if math.isnan(hue):
        return None
    return min(tc.COLOURS, key=lambda c: hue_distance(hue, trained_hue_sat(c)[0]))


def colour_correct(image: np.ndarray, colour: str) -> bool:
    """The largest saturated object's hue is nearest the prompted colour among the testbed's colours."""
    return nearest_colour(object_hue(image)[0]) == colour


def colour_drift(image: np.ndarray, colour: str) -> tuple[float, float]:
    """(|hue error| in degrees, |saturation error|) of the largest saturated object against the
    prompted colour's trained hue and saturation: a green circle for "red" reads about 120 degrees."""
    hue, sat = object_hue(image)
    if math.isnan(hue):
        return float("nan"), float("nan")
    want_h, want_s = trained_hue_sat(colour)
    return hue_distance(hue, want_h), abs(sat - want_s)


def border_tint(image: np.ndarray) -> float:
    """Largest |mean colour of the background in a BORDER-px edge strip - that of the 2 * BORDER px just inside it|,
    over the four edges and the three channels, in levels (nan where no pair of strips has 16 background pixels
    each). Against the strip beside it, not the middle: the drawn backgrounds' own shading varies slowly."""
    img = np.asarray(image, np.float64)[..., :3]
    h, w = img.shape[:2]
    clear = clear_of_objects(image)
    b, inside = BORDER, 3 * BORDER
    pairs = [(np.s_[:b, :], np.s_[b:inside, :]), (np.s_[h - b :, :], np.s_[h - inside : h - b, :]),
             (np.s_[:, :b], np.s_[:, b:inside]), (np.s_[:, w - b :], np.s_[:, w - inside : w - b])]
    shifts = []
    for edge, near in pairs:
        a, c = img[edge][clear[edge]], img[near][clear[near]]
        if len(a) >= 16 and len(c) >= 16:
            shifts.append(float(np.abs(a.mean(0) - c.mean(0)).max()))
    return max(shifts) if shifts else float("nan")


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
    colour_ok: bool  # the largest saturated object's hue is nearest the prompted colour
    object_detail: float  # raw band contrast (divide by the 1x plain reference)
    background_detail: float
    halo: float
    hue_error: float
    sat_error: float
    speckle: float
    clipped: float
    border: float = float("nan")  # nan in measures made before the column existed


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
        colour_ok=colour_correct(image, colour),
        object_detail=object_detail(image, colour),
        background_detail=background_detail(image),
        halo=halo(image, colour),
        hue_error=hue_err,
        sat_error=sat_err,
        speckle=speckle(image, colour),
        clipped=clipped(image),
        border=border_tint(image),
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


BOOTSTRAP_RESAMPLES = 2000


def mean_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of the finite values (nan, nan with none). Halo and
    clipping are heavy-tailed per image (most read ~0, a few carry the mean), so a cell's mean moves a
    lot with its seeds; the fixed resampling seed keeps the table reproducible."""
    v = np.asarray([x for x in values if not math.isnan(x)], float)
    if not v.size:
        return float("nan"), float("nan")
    rng = np.random.default_rng(0)
    means = v[rng.integers(0, v.size, (BOOTSTRAP_RESAMPLES, v.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _by_prompt(measures, value) -> dict[tuple[str, str], float]:
    groups: dict[tuple[str, str], list[float]] = {}
    for m in measures:
        groups.setdefault((m.colour, m.shape), []).append(value(m))
    return {k: nanmean(v) for k, v in groups.items()}


@dataclass(frozen=True)
class Reference:
    """What "native" means for one model (mean raw detail of its 1x plain samples) and what the data
    holds (mean object texture power of drawn pictures).

    Both are kept per prompt, so a cell holding only some prompts, as a small cell does, is judged
    against its own prompts' texture (models draw some colours' stripes weaker than others)."""

    object_detail: float  # over every sample: the fallback for a prompt the reference lacks
    background_detail: float
    object_by_prompt: dict[tuple[str, str], float]  # (colour, shape) -> mean raw object detail
    drawn_power: float = float("nan")  # mean object texture power of drawn pictures (nan: none given)
    drawn_power_by_prompt: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, measures: list[Measure], drawn: list[Measure] = ()) -> Reference:
        return cls(nanmean(m.object_detail for m in measures), nanmean(m.background_detail for m in measures),
                   _by_prompt(measures, lambda m: m.object_detail),
                   nanmean(m.object_detail**2 for m in drawn), _by_prompt(drawn, lambda m: m.object_detail**2))

    @staticmethod
    def _for(m: Measure, table: dict, fallback: float) -> float:
        ref = table.get((m.colour, m.shape), float("nan"))
        return ref if math.isfinite(ref) and ref > 0 else fallback

    def object_native(self, m: Measure) -> float:
        """Native raw object detail for `m`'s prompt."""
        return self._for(m, self.object_by_prompt, self.object_detail)

    def drawn_object_power(self, m: Measure) -> float:
        """Object texture power of drawn pictures of `m`'s prompt (nan without drawn pictures)."""
        return self._for(m, self.drawn_power_by_prompt, self.drawn_power)

    def as_dict(self) -> dict:
        return {"object_detail": self.object_detail, "background_detail": self.background_detail,
                "object_by_prompt": {f"{c} {s}": v for (c, s), v in self.object_by_prompt.items()},
                "drawn_power": self.drawn_power,
                "drawn_power_by_prompt": {f"{c} {s}": v for (c, s), v in self.drawn_power_by_prompt.items()}}


def summarise(measures: list[Measure], ref: Reference) -> dict:
    """Cell statistics: shares with Wilson intervals, means of the rest, detail relative to `ref`."""
    if not measures:
        raise ValueError("measures is empty; need at least one image to summarise")
    n = len(measures)
    one = sum(m.n_objects == 1 for m in measures)
    shape = sum(m.shape_ok for m in measures)
    colour = sum(m.colour_ok for m in measures)
    return {
        "n": n,
        "one": one / n, "one_ci": wilson(one, n),
        "shape": shape / n, "shape_ci": wilson(shape, n),
        "colour": colour / n, "colour_ci": wilson(colour, n),
        "count": float(np.mean([m.n_objects for m in measures])),
        "detail": nanmean(m.object_detail / ref.object_native(m) for m in measures),
        "detail_bg": nanmean(m.background_detail for m in measures) / ref.background_detail,
        "stripes": nanmean(m.object_detail**2 / ref.drawn_object_power(m) for m in measures),
        "halo": nanmean(m.halo for m in measures), "halo_ci": mean_interval([m.halo for m in measures]),
        "hue_error": nanmean(m.hue_error for m in measures),
        "sat_error": nanmean(m.sat_error for m in measures),
        "speckle": float(np.mean([m.speckle for m in measures])),
        "clipped": float(np.mean([m.clipped for m in measures])),
        "clipped_ci": mean_interval([m.clipped for m in measures]),
        "border": nanmean(m.border for m in measures),
    }
