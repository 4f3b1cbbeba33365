"""The bottleneck-sampling configuration: fields, defaults, ranges and checks (torch-free)."""

from __future__ import annotations

import dataclasses

from ...validation import option, typed


@typed
@dataclasses.dataclass(frozen=True)
class BottleneckConfig:
    """Bottleneck sampling (high -> low -> high): most steps at a lower resolution, a fraction of the cost.

    `None` fields take the default schedule (see hires.techniques.bottleneck.slices).
    """

    enabled: bool = False
    # each stage's side as a factor of the requested side; must start and end at 1.0 (the request)
    scales: tuple[float, ...] = option((1.0, 0.5, 1.0), low=0, high=1, low_open=True)
    # share of the call's steps each stage runs (sums to 1); None: the default schedule
    step_fractions: tuple[float, ...] | None = option(None, low=0, high=1, low_open=True)
    resample: str = option("lanczos", choices=("lanczos", "bicubic"))  # how latents move between stages
    # noise level re-injected at each transition, as a fraction of the schedule; None: default
    renoise: tuple[float, ...] | None = option(None, low=0, high=1, low_open=True)
    # per-stage timestep shift for flow families; None: default
    shifts: tuple[float, ...] | None = option(None, low=0, low_open=True)

    def __post_init__(self):
        owner = "BottleneckConfig"
        scales = tuple(self.scales)
        if len(scales) < 3:
            raise ValueError(f"{owner}.scales={self.scales!r} must be 3 or "
                             f"more side factors in (0, 1], e.g. (1.0, 0.5, 1.0)")
        if scales[0] != 1.0 or scales[-1] != 1.0:
            raise ValueError(f"{owner}.scales={self.scales!r} must start and end at 1.0: bottleneck sampling begins "
                             "and returns to the requested size")
        object.__setattr__(self, "scales", scales)
        if self.step_fractions is not None:
            fractions = tuple(self.step_fractions)
            if len(fractions) != len(scales) or abs(sum(fractions) - 1) > 1e-6:
                raise ValueError(f"{owner}.step_fractions={self.step_fractions!r} needs one positive share per stage "
                                 f"({len(scales)}) summing to 1")
            object.__setattr__(self, "step_fractions", fractions)
        for name in ("renoise", "shifts"):
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(value)
            expected = len(scales) - 1 if name == "renoise" else len(scales)
            if len(value) != expected:
                what = "one fraction in (0, 1] per transition" if name == "renoise" else "one positive shift per stage"
                raise ValueError(f"{owner}.{name}={getattr(self, name)!r} needs {what} ({expected})")
            object.__setattr__(self, name, value)

    def validate_for(self, info) -> None:
        if self.shifts is not None and info.prediction_type != "flow":
            raise ValueError(f"BottleneckConfig.shifts={self.shifts!r} is a flow-matching time shift; {info.name} "
                             f"predicts {info.prediction_type!r}. Leave shifts=None for this family")
