"""The bottleneck configuration (torch-free)."""

from __future__ import annotations

import dataclasses

from ...validation import choice, typed


@typed
@dataclasses.dataclass(frozen=True)
class BottleneckConfig:
    """Bottleneck sampling (high -> low -> high): most steps at a lower resolution, a fraction of the cost.

    `None` fields take the default schedule (see hires.techniques.bottleneck.slices).
    """

    enabled: bool = False
    # each stage's side as a factor of the requested side; must start and end at 1.0 (the request)
    scales: tuple[float, ...] = (1.0, 0.5, 1.0)
    # share of the call's steps each stage runs (sums to 1); None: the default schedule
    step_fractions: tuple[float, ...] | None = None
    resample: str = "lanczos"  # how latents move between stages: "lanczos" or "bicubic"
    # noise level re-injected at each transition, as a fraction of the schedule; None: default
    renoise: tuple[float, ...] | None = None
    # per-stage timestep shift for flow families; None: default
    shifts: tuple[float, ...] | None = None

    def __post_init__(self):
        owner = "BottleneckConfig"
        scales = tuple(self.scales)
        if len(scales) < 3 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1 for v in scales):
            raise ValueError(f"{owner}.scales={self.scales!r} must be 3 or more side factors in (0, 1], e.g. (1.0, 0.5, 1.0)")
        if scales[0] != 1.0 or scales[-1] != 1.0:
            raise ValueError(f"{owner}.scales={self.scales!r} must start and end at 1.0: bottleneck sampling begins "
                             "and returns to the requested size")
        object.__setattr__(self, "scales", scales)
        if self.step_fractions is not None:
            fractions = tuple(self.step_fractions)
            if len(fractions) != len(scales) or any(not (isinstance(v, (int, float)) and v > 0) for v in fractions) \
                    or abs(sum(fractions) - 1) > 1e-6:
                raise ValueError(f"{owner}.step_fractions={self.step_fractions!r} needs one positive share per stage "
                                 f"({len(scales)}) summing to 1")
            object.__setattr__(self, "step_fractions", fractions)
        for name in ("renoise", "shifts"):
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(value)
            expected = len(scales) - 1 if name == "renoise" else len(scales)
            check = (lambda v: 0 < v <= 1) if name == "renoise" else (lambda v: v > 0)
            if len(value) != expected or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not check(v) for v in value):
                what = "one fraction in (0, 1] per transition" if name == "renoise" else "one positive shift per stage"
                raise ValueError(f"{owner}.{name}={getattr(self, name)!r} needs {what} ({expected})")
            object.__setattr__(self, name, value)
        choice(owner, "resample", self.resample, ("lanczos", "bicubic"))

    def validate_for(self, info) -> None:
        if self.shifts is not None and info.prediction_type != "flow":
            raise ValueError(f"BottleneckConfig.shifts={self.shifts!r} is a flow-matching time shift; {info.name} "
                             f"predicts {info.prediction_type!r}. Leave shifts=None for this family")
