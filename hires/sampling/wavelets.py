"""A 2D discrete wavelet transform in torch (Daubechies family), and the low-band swap built on it.

Conventions follow PyWavelets (`pywt.dwt2` / `pywt.idwt2`, the tests compare against it):
- modes "symmetric" (half-sample symmetric extension; band side floor((n + L - 1) / 2)) and
  "periodization" (periodic extension; band side ceil(n / 2));
- bands of one level are (LL, (LH, HL, HH)) = pywt's (cA, (cH, cV, cD)): the first letter is the
  filter along the height axis, the second along the width axis.

Filters are built by spectral factorisation (Daubechies' construction), not copied from a table:
`daubechies_filter(N)` gives the 2N-tap minimum-phase low-pass filter of dbN ("haar" is db1).
Every transform runs in float64 math on float32 tensors at least and casts back to the input dtype.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

MODES = ("symmetric", "periodization")
MAX_ORDER = 10  # spectral factorisation stays accurate to ~1e-12 up to here


def wavelet_names() -> tuple[str, ...]:
    return ("haar",) + tuple(f"db{n}" for n in range(1, MAX_ORDER + 1))


def parse_wavelet(name: str) -> int:
    """Daubechies order of a wavelet name ("haar" = "db1"); anything else is a ValueError."""
    if isinstance(name, str):
        if name == "haar":
            return 1
        if name.startswith("db") and name[2:].isdigit() and 1 <= int(name[2:]) <= MAX_ORDER:
            return int(name[2:])
    raise ValueError(f"wavelet={name!r} is not supported; use one of {', '.join(wavelet_names())}")


@functools.lru_cache(maxsize=None)
def daubechies_filter(order: int) -> tuple[float, ...]:
    """Reconstruction low-pass filter of dbN (sum sqrt(2), unit norm), pywt's `rec_lo` order."""
    # |m0(w)|^2 = cos^2N(w/2) P(sin^2(w/2)), P(y) = sum_k C(N-1+k, k) y^k. Each root y of P gives
    # z + 1/z = 2 - 4y; keeping the root inside the unit circle gives the minimum-phase filter.
    n = order
    p = [math.comb(n - 1 + k, k) for k in range(n)]  # ascending powers of y
    zeros = []
    for y in np.roots(p[::-1]) if n > 1 else []:
        pair = np.roots([1.0, -(2.0 - 4.0 * y), 1.0])
        zeros.append(pair[np.argmin(np.abs(pair))])
    poly = np.real(np.poly(zeros)) if zeros else np.array([1.0])
    binomial = np.array([math.comb(n, k) for k in range(n + 1)], dtype=np.float64)
    h = np.convolve(binomial, poly)
    h = h * (math.sqrt(2.0) / h.sum())
    return tuple(float(v) for v in h)


def _filters(order: int, device, dtype) -> dict[str, torch.Tensor]:
    rec_lo = torch.tensor(daubechies_filter(order), dtype=torch.float64)
    taps = rec_lo.numel()
    signs = torch.tensor([(-1.0) ** k for k in range(taps)], dtype=torch.float64)
    rec_hi = signs * rec_lo.flip(0)
    out = {"rec_lo": rec_lo, "rec_hi": rec_hi, "dec_lo": rec_lo.flip(0), "dec_hi": rec_hi.flip(0)}
    return {k: v.to(device=device, dtype=dtype) for k, v in out.items()}


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _extend(x: torch.Tensor, before: int, after: int, mode: str) -> torch.Tensor:
    """Extend the last axis by `before`/`after` samples (any amount, by folding indices)."""
    n = x.shape[-1]
    index = torch.arange(-before, n + after, device=x.device)
    if mode == "symmetric":
        index = index % (2 * n)
        index = torch.where(index < n, index, 2 * n - 1 - index)
    else:
        index = index % n
    return x.index_select(-1, index)


def _analysis(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One level along the last axis: (approximation, detail)."""
    taps = lo.numel()
    if mode == "periodization":
        if x.shape[-1] % 2:
            x = torch.cat([x, x[..., -1:]], dim=-1)  # pywt repeats the last sample for odd lengths
        half = taps // 2
        x = _extend(x, half - 1, half, mode)
    else:
        # pywt samples the full convolution at even offsets from taps: drop the first extended sample
        count = (x.shape[-1] + taps - 1) // 2
        x = _extend(x, taps - 2, taps - 1, mode)
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    weight = torch.stack([lo.flip(0), hi.flip(0)]).unsqueeze(1)  # conv1d correlates: flip for convolution
    out = F.conv1d(flat, weight, stride=2)
    if mode == "symmetric":
        out = out[..., :count]
    return out[:, 0].reshape(*shape[:-1], -1), out[:, 1].reshape(*shape[:-1], -1)


def _synthesis(a: torch.Tensor, d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, mode: str) -> torch.Tensor:
    """Inverse of `_analysis` along the last axis."""
    taps = lo.numel()
    shape = a.shape
    pair = torch.stack([a.reshape(-1, shape[-1]), d.reshape(-1, shape[-1])], dim=1)
    weight = torch.stack([lo, hi]).unsqueeze(1)  # (2 in, 1 out, taps)
    full = F.conv_transpose1d(pair, weight, stride=2)[:, 0]  # upsample and convolve, summed
    count = shape[-1]
    if mode == "periodization":
        n = 2 * count
        out = full.new_zeros(full.shape[0], n)
        shift = taps // 2 - 1
        index = (torch.arange(full.shape[-1], device=full.device) - (taps - 2) + shift) % n
        out.index_add_(1, index, full)
    else:
        out = full[:, taps - 2: taps - 2 + 2 * count - taps + 2]
    return out.reshape(*shape[:-1], -1)


def dwt2(x: torch.Tensor, wavelet: str = "db4", mode: str = "symmetric"):
    """One level of the 2D DWT over the last two axes: (LL, (LH, HL, HH)) like pywt.dwt2."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; use one of {', '.join(map(repr, MODES))}")
    f = _filters(parse_wavelet(wavelet), x.device, _work_dtype(x))
    work = x.to(f["dec_lo"].dtype)
    lo_w, hi_w = _analysis(work, f["dec_lo"], f["dec_hi"], mode)  # along width
    ll, lh_ = _analysis(lo_w.transpose(-1, -2), f["dec_lo"], f["dec_hi"], mode)  # along height
    hl, hh = _analysis(hi_w.transpose(-1, -2), f["dec_lo"], f["dec_hi"], mode)
    bands = [ll, lh_, hl, hh]
    ll, lh, hl, hh = (b.transpose(-1, -2).to(x.dtype) for b in bands)
    # lh_ is low along width and high along height: pywt's cH (detail along the height axis).
    return ll, (lh, hl, hh)


def idwt2(ll: torch.Tensor, details, wavelet: str = "db4", mode: str = "symmetric") -> torch.Tensor:
    """Inverse of `dwt2`."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; use one of {', '.join(map(repr, MODES))}")
    lh, hl, hh = details
    f = _filters(parse_wavelet(wavelet), ll.device, _work_dtype(ll))
    dtype = f["rec_lo"].dtype
    ll, lh, hl, hh = (b.to(dtype) for b in (ll, lh, hl, hh))
    lo_w = _synthesis(ll.transpose(-1, -2), lh.transpose(-1, -2), f["rec_lo"], f["rec_hi"], mode).transpose(-1, -2)
    hi_w = _synthesis(hl.transpose(-1, -2), hh.transpose(-1, -2), f["rec_lo"], f["rec_hi"], mode).transpose(-1, -2)
    out = _synthesis(lo_w, hi_w, f["rec_lo"], f["rec_hi"], mode)
    return out


def wavedec2(x: torch.Tensor, wavelet: str = "db4", level: int = 1, mode: str = "symmetric"):
    """Multi-level 2D DWT like pywt.wavedec2: [LL_level, details_level, ..., details_1]."""
    if isinstance(level, bool) or not isinstance(level, int) or level < 1:
        raise ValueError(f"level={level!r} must be an int >= 1")
    coeffs = []
    approx = x
    for _ in range(level):
        approx, details = dwt2(approx, wavelet, mode)
        coeffs.append(details)
    return [approx] + coeffs[::-1]


def waverec2(coeffs, wavelet: str = "db4", mode: str = "symmetric") -> torch.Tensor:
    """Inverse of `wavedec2` (like pywt.waverec2: an odd-sized approximation is cropped to fit)."""
    approx = coeffs[0]
    for details in coeffs[1:]:
        h, w = details[0].shape[-2:]
        approx = idwt2(approx[..., :h, :w], details, wavelet, mode)
    return approx


def low_band(x: torch.Tensor, wavelet: str = "db4", level: int = 1, mode: str = "symmetric") -> torch.Tensor:
    """The level-`level` approximation (LL) band of x, computed in float32 or better."""
    return wavedec2(x.to(_work_dtype(x)), wavelet, level, mode)[0]


def swap_low_band(sample: torch.Tensor, guide_low: torch.Tensor, wavelet: str = "db4", level: int = 1,
                  mode: str = "symmetric") -> torch.Tensor:
    """`sample` with its LL band replaced by `guide_low` (the guide's `low_band`), high bands kept.

    Runs in float32 (or float64) and casts back to `sample`'s dtype; the output has sample's size.
    With "periodization" the result's bands are exactly the guide's LL and the sample's details. The
    "symmetric" mode (the paper's) is redundant, so that holds for coefficients more than
    taps/2 - 1 (3 for db4) per level from a border; near borders the reconstruction blends both.
    The swap is affine in `sample`, so it commutes with guidance combinations u + w (c - u).
    """
    work = sample.to(_work_dtype(sample))
    coeffs = wavedec2(work, wavelet, level, mode)
    if coeffs[0].shape != guide_low.shape:
        raise ValueError(f"guide low band has shape {tuple(guide_low.shape)}, "
                         f"the sample's is {tuple(coeffs[0].shape)}; "
                         "the guide must be the low band of an image of the sample's size")
    coeffs[0] = guide_low.to(work.dtype)
    out = waverec2(coeffs, wavelet, mode)[..., : sample.shape[-2], : sample.shape[-1]]
    return out.to(sample.dtype)
