"""Shared pieces of the coherence testbed: the synthetic data set and the object-count metric.

Testbed v2: the shapes carry texture at a fixed pixel period (see OBJECT_PERIOD), measured by
testbed_metrics.py together with halo, colour drift, speckle and clipping.

One implementation used by train_testbed.py, eval_coherence.py and tests/test_testbed.py, so the
data a model is trained on and the metric that judges it cannot drift apart.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
# Saturated, hue-separated colours (>= 60 degrees apart) so hue alone tells them apart, while the
# backgrounds stay low-saturation and never segment as an object colour.
COLOURS = {
    "red": (220, 40, 40),
    "yellow": (225, 200, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
}
HUE_CENTRES = {"red": 0.0, "yellow": 55.0, "green": 128.0, "blue": 226.0}
HUE_HALF_WIDTH = 28.0
MIN_SATURATION = 0.40
MIN_VALUE = 0.25

# Vocabulary for the word-level tokenizers: every caption word plus specials.
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
CAPTION_WORDS = ("a",) + tuple(COLOURS) + SHAPES


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def all_prompts() -> list[tuple[str, str, str]]:
    """(caption, colour, shape) for every colour/shape combination, in a fixed order."""
    return [(caption(c, s), c, s) for s in SHAPES for c in COLOURS]


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # uint8 HxWx3
    colour: str
    shape: str
    caption: str


# Native-scale detail (testbed v2): every picture carries texture of a fixed period in *pixels*, so
# a model that really draws at a larger size keeps that period while an upscaled base image shows it
# k times too coarse. Sinusoids keep the spectrum to one ring (no harmonics to confuse the metric);
# the two textures run at right angles and different periods so each region is measured on its own.
OBJECT_PERIOD = 6.0  # px, object stripes along (x + y): "/" stripes 3 px wide
BACKGROUND_PERIOD = 4.0  # px, background grain along (x - y)
OBJECT_TEXTURE = 0.18  # object colour is scaled by 0.9 +- this (hue and saturation stay)
BACKGROUND_TEXTURE = 12.0  # grey levels, +- amplitude of the background grain


def diagonal_wave(size_hw: tuple[int, int], period: float, phase: float, sign: int) -> np.ndarray:
    """sin(2 pi (x + sign*y) / (sqrt 2 period) + phase): stripes of `period` px across, float32."""
    h, w = size_hw
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.sin(2 * np.pi * (x + sign * y) / (np.sqrt(2) * period) + phase).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation grey with a fine grain of BACKGROUND_PERIOD px, float in [0, 255]."""
    grey = rng.uniform(150, 222)
    tint = rng.uniform(-8, 8, size=3)  # slight warm/cool cast, still far below MIN_SATURATION
    base = np.clip(grey + tint, 0, 255)
    img = np.broadcast_to(base, (size, size, 3)).astype(np.float32).copy()
    if rng.random() < 0.5:
        # Low-frequency shading: coarse noise upsampled smoothly; amplitude small and grey.
        coarse = rng.normal(0, 1, size=(5, 5)).astype(np.float32)
        tex = ndimage.zoom(coarse, size / 5, order=3)[:size, :size]
        img += (rng.uniform(4, 8) * tex)[..., None]
    grain = diagonal_wave((size, size), BACKGROUND_PERIOD, rng.uniform(0, 2 * np.pi), -1)
    img += (BACKGROUND_TEXTURE * grain)[..., None]
    return np.clip(img, 1, 254)


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape of half-extent r centred at (cx, cy)."""
    ss = 4  # supersampling for soft, anti-aliased edges
    coords = (np.arange(size * ss) + 0.5) / ss
    x, y = np.meshgrid(coords, coords)
    if shape == "circle":
        m = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    elif shape == "square":
        m = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    elif shape == "triangle":
        # Upright triangle filling the box [cx-r, cx+r] x [cy-r, cy+r].
        top, bottom = cy - r, cy + r
        t = np.clip((y - top) / (2 * r), 0, 1)
        m = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= r * t)
    else:
        raise ValueError(f"shape={shape!r} is not one of {SHAPES}")
    return m.reshape(size, ss, size, ss).mean(axis=(1, 3)).astype(np.float32)


def make_sample(seed: int, index: int, size: int = IMAGE_SIZE, colour: str | None = None,
                shape: str | None = None) -> Sample:
    """Deterministic sample `index` of the data set with base seed `seed`; `colour` / `shape` force
    the prompt (the draws stay the same, so the rest of the picture does too)."""
    rng = np.random.default_rng([seed, index])
    drawn_colour = list(COLOURS)[rng.integers(len(COLOURS))]
    drawn_shape = SHAPES[rng.integers(len(SHAPES))]
    colour, shape = colour or drawn_colour, shape or drawn_shape
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"colour={colour!r}, shape={shape!r}: need one of {tuple(COLOURS)} and one of {SHAPES}")
    img = _background(rng, size)
    r = rng.uniform(0.12, 0.24) * size  # half-extent: objects span 24%..48% of the side
    cx = rng.uniform(r + 1, size - r - 1)
    cy = rng.uniform(r + 1, size - r - 1)
    cov = _shape_mask(shape, size, cx, cy, r)[..., None]
    col = np.clip(np.array(COLOURS[colour], np.float32) + rng.uniform(-12, 12, size=3), 0, 230)
    stripes = 0.9 + OBJECT_TEXTURE * diagonal_wave((size, size), OBJECT_PERIOD, rng.uniform(0, 2 * np.pi), 1)
    img = img * (1 - cov) + np.clip(col * stripes[..., None], 1, 254) * cov
    return Sample(img.round().astype(np.uint8), colour, shape, caption(colour, shape))


def drawn_pictures(n: int, seed: int = 424_242, size: int = IMAGE_SIZE, stride: int = 1) -> list[Sample]:
    """n held-out drawn pictures, picture i of prompt stride * i mod 12 (the order of all_prompts; stride 5
    spreads a few pictures over the colours): the data's own texture, per prompt, for judging samples and VAE
    round trips (seed unused in training)."""
    prompts = all_prompts()
    return [make_sample(seed, i, size, *prompts[(stride * i) % len(prompts)][1:]) for i in range(n)]


def make_dataset(seed: int, n: int, size: int = IMAGE_SIZE):
    """Images (n, size, size, 3) uint8 and their captions."""
    samples = [make_sample(seed, i, size) for i in range(n)]
    return np.stack([s.image for s in samples]), [s.caption for s in samples]


# ---------------------------------------------------------------- metric


def hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), saturation and value, vectorised."""
    rgb = np.asarray(image, np.float32)[..., :3] / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-6), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    d = np.maximum(delta, 1e-6)
    hue = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60.0
    return hue, sat, mx


def colour_mask(image: np.ndarray, colour: str) -> np.ndarray:
    """Boolean mask of pixels whose hue is within the band of `colour` and that are saturated."""
    if colour not in HUE_CENTRES:
        raise ValueError(f"colour={colour!r} is not one of {tuple(HUE_CENTRES)}")
    hue, sat, mx = hsv(image)
    diff = np.abs((hue - HUE_CENTRES[colour] + 180.0) % 360.0 - 180.0)
    return (diff <= HUE_HALF_WIDTH) & (sat >= MIN_SATURATION) & (mx >= MIN_VALUE)


def min_object_area(height: int, width: int) -> int:
    """Smallest component counted as an object: drops speckle but keeps training-scale copies.

    The smallest training object (half-extent 0.12 * 64 px, a triangle) covers ~115 px; a quarter
    of that still counts, so a small duplicate at any output size is never missed.
    """
    return max(24, round(0.0005 * height * width))


@dataclass(frozen=True)
class Count:
    n_objects: int
    areas: tuple[float, ...]  # each counted object's area / image area


def count_objects(image: np.ndarray, colour: str, min_area: int | None = None) -> Count:
    """Connected components (8-connected) of the prompted colour with area >= min_area."""
    h, w = image.shape[:2]
    if min_area is None:
        min_area = min_object_area(h, w)
    mask = colour_mask(image, colour)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return Count(0, ())
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    kept = sizes[sizes >= min_area]
    return Count(int(kept.size), tuple(float(s) / (h * w) for s in kept))


@dataclass(frozen=True)
class CellStats:
    k: int
    share_exactly_one: float
    mean_count: float
    mean_area: float  # mean per-object area / image area over all counted objects (nan if none)


def summarise(counts: list[Count]) -> CellStats:
    if not counts:
        raise ValueError("counts is empty; need at least one image to summarise")
    areas = [a for c in counts for a in c.areas]
    return CellStats(
        k=len(counts),
        share_exactly_one=float(np.mean([c.n_objects == 1 for c in counts])),
        mean_count=float(np.mean([c.n_objects for c in counts])),
        mean_area=float(np.mean(areas)) if areas else float("nan"),
    )


def rgb_to_hue_degrees(rgb) -> float:
    """Reference hue via colorsys, used by tests to cross-check colour_mask."""
    h, _, _ = colorsys.rgb_to_hsv(*(np.asarray(rgb, float) / 255.0))
    return h * 360.0
