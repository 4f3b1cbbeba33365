"""The stage engine: every multi-stage method (structure guidance, bottleneck sampling) runs here.

A staged technique is a *planner*: given the call (`StageRequest`) and the plan so far, it returns
the plan it wants, a list of `Stage`s. `plan_stages` starts from the trivial plan (one stage at the
requested size, from pure noise, the pipeline's own schedule) and asks each planner in install
order, so composition is explicit: structure guidance turns the trivial plan into its ladder, then
bottleneck sampling replaces every stage that samples from pure noise with its high-low-high slices.
The plan is data first (sizes, planned steps, the VAE passes each stage runs, per-stage settings),
so the same derivation serves a running call, the memory planner (which plans every pass of the
plan) and `hires generate --dry-run` (planners built without a pipeline: hires.runtime.stage_plan).

How a call runs. When the user's call reaches `encode_prompt` (the first method every supported
pipeline calls after validating its inputs), the engine reads the call's arguments from its frame
(hires.runtime.PipelineCalls), asks the planners, and if the plan is more than the trivial one it
runs every stage as a nested call of the same pipeline at the stage's size with
`output_type="latent"`. While a stage runs, the engine
- passes the stage's own call arguments (guidance scale, size conditioning) and pushes its
  per-technique settings onto the stage call's state (`CallState.stage`, `.stage_setting(type)`);
- lets the stage shape the schedule the pipeline builds (`Stage.schedule`: truncate, slice, shift);
- returns from `prepare_latents` the stage's start: `Stage.start(stage, previous)` gives a clean
  latent which is noised to the stage's first timestep with the call's generator;
- for a stage that stops before its schedule does, keeps the clean estimate of its last step;
- hands each scheduler step's result to the stage's `after_step` callables (planners that run after
  the stage's owner add them, e.g. skip residual's blend toward the noised start), in the spatial
  layout; while the stage runs, `Stage.x0` and `Stage.noise` hold its clean start and the noise it
  was noised with.
The user's own call then only decodes: its schedule is emptied and its `prepare_latents` returns
the last stage's latent. Every override is a ledger shadow of the attachment, taken out when the
user's call has been set up, when a stage raises, by the next call, or by `hires.remove`.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from . import schedules

# __call__ arguments that resize the request inside the pipeline; stages pass exact sizes instead.
RESIZING_ARGUMENTS = {"use_resolution_binning": False}
ENGINE_ATTRIBUTE = "_hires_stage_engine"


def tile_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise ValueError(f"cannot match a batch of {x.shape[0]} guides to a batch of {batch}")
    return x.repeat(batch // x.shape[0], *([1] * (x.ndim - 1)))


def replace_latents(result, tensor):
    """`prepare_latents`' result (a tensor, or a tuple led by one) with `tensor` in the latents' place."""
    current = result[0] if isinstance(result, tuple) else result
    if current.shape != tensor.shape:
        raise RuntimeError(f"a hires stage prepared latents of shape {tuple(tensor.shape)} where the "
                           f"pipeline expects {tuple(current.shape)}")
    tensor = tensor.to(device=current.device, dtype=current.dtype)
    return (tensor, *result[1:]) if isinstance(result, tuple) else tensor


@dataclasses.dataclass(frozen=True)
class StageRequest:
    """What planners see of a call."""

    height: int
    width: int
    steps: int | None  # num_inference_steps
    arguments: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the call's named arguments
    parameters: tuple[str, ...] = ()  # the names the pipeline's __call__ takes
    generator: Any = None
    image_size: tuple[int, int] | None = None  # a picture the stages start from instead of a base generation


@dataclasses.dataclass(frozen=True)
class VAEPass:
    """A VAE decode (of a latent for an image of height x width pixels) or encode (of such an image)."""

    kind: str  # "decode" or "encode"
    height: int
    width: int
    what: str


@dataclasses.dataclass(eq=False)
class Stage:
    """One nested pipeline call of a plan."""

    height: int
    width: int
    owner: str  # the technique that planned it ("call": the trivial plan's stage)
    generator: Any = None
    call_arguments: dict = dataclasses.field(default_factory=dict)  # __call__ arguments of this stage
    # settings of other techniques for this stage, by their type: CallState.stage_setting(type) reads them
    settings: dict = dataclasses.field(default_factory=dict)
    planned_steps: int | None = None  # the denoising steps it will run, for a schedule of the request's steps
    vae_passes: tuple[VAEPass, ...] = ()  # what its start runs through the VAE (the call's own decode aside)
    # it re-runs the tail of the schedule from the previous stage's upscaled, finished result (structure
    # guidance's later stages): techniques that guide such a refinement toward that result act on it
    refines: bool = False
    # schedule(stage, scheduler, set_timesteps, args, kwargs) builds this stage's schedule by calling
    # set_timesteps itself; None: the pipeline's own.
    schedule: Callable | None = None
    # start(stage, previous stage) -> clean spatial latent to noise to the first timestep; None: pure noise.
    start: Callable | None = None
    stops_early: bool = False  # its result is the clean estimate at its last step, not its output
    # after_step(stage, step_index, latents) -> latents, for each scheduler step's result (spatial
    # layout, the batch the loop denoises); run in order
    after_step: list = dataclasses.field(default_factory=list)
    data: Any = None  # the owner's own per-stage object
    parent: "Stage | None" = None  # the stage this one is a slice of
    # filled while it runs
    timesteps: tuple = ()
    start_timestep: Any = None
    x0: torch.Tensor | None = None
    noise: torch.Tensor | None = None  # the noise `x0` was noised with (spatial, float32), while it runs
    result: torch.Tensor | None = None  # spatial latent handed to the next stage
    output: Any = None  # the stage call's own latent output (packed where the family packs)
    steps_taken: int = 0
    target: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def trivial(self) -> bool:
        return self.start is None and self.schedule is None and not self.stops_early and not self.after_step

    def set(self, setting: Any) -> None:
        """Push `setting` (of its type) onto this stage's call."""
        self.settings[type(setting)] = setting

    def drop_tensors(self) -> None:
        """Let go of the latents once the run is over (`last_run` keeps the record, not the tensors)."""
        self.x0 = self.noise = self.result = self.output = self.target = None
        if hasattr(self.data, "drop_tensors"):
            self.data.drop_tensors()


@dataclasses.dataclass
class _Pending:
    """The user's call after its stages ran: it only decodes the last stage's latent."""

    frame: Any
    latents: torch.Tensor
    schedule_done: bool = False
    latents_done: bool = False


class StageEngine:
    """One per attachment: owns encode_prompt / prepare_latents and, during a run, the scheduler."""

    def __init__(self, attachment):
        self.attachment = attachment
        self.pipe = attachment.pipe
        self.info = attachment.info
        self.latents = attachment.latents  # the layout's adapter (hires.sampling.latents)
        self.planners: list[tuple[str, Any]] = []
        self.current: Stage | None = None
        self.running = False
        self.pending: _Pending | None = None
        self.last_run: tuple[Stage, ...] | None = None
        self._scheduler_shadows: list = []
        attachment.shadow(self.pipe, ENGINE_ATTRIBUTE, self)  # found by `planner_of`, taken out by hires.remove
        attachment.wrap_method(self.pipe, "encode_prompt", self._wrap_encode_prompt)
        attachment.wrap_method(self.pipe, "prepare_latents", self._wrap_prepare_latents)
        if hasattr(self.pipe, "prepare_image") and "control_image" in attachment.calls.parameters:
            attachment.wrap_method(self.pipe, "prepare_image", _wrap_prepare_image)

    def add_planner(self, name: str, planner) -> None:
        """`planner.plan(request, stages) -> stages`; planners run in the order they were added."""
        self.planners.append((name, planner))

    def planner(self, name: str):
        """The planner added as `name`, or None."""
        return next((p for n, p in self.planners if n == name), None)

    # -- pipeline entry points ---------------------------------------------------------------
    def _wrap_encode_prompt(self, original):
        def encode_prompt(*args, **kwargs):
            call = self.attachment.calls.called_by(sys._getframe(1))
            new_call = call is not None and (self.pending is None or self.pending.frame is not call.frame)
            if new_call and not self.running:
                self._abandon()
                self._maybe_run(call)
            return original(*args, **kwargs)

        return encode_prompt

    def _wrap_prepare_latents(self, original):
        def prepare_latents(*args, **kwargs):
            result = original(*args, **kwargs)
            call = self.attachment.calls.called_by(sys._getframe(1))
            if call is None:
                return result
            stage = self.current
            if self.running and stage is not None and stage.x0 is not None:
                current = result[0] if isinstance(result, tuple) else result
                target = stage.target = torch.empty_like(current)
                if stage.start_timestep is not None:  # the pipeline set its schedule before its latents
                    self._fill(stage)
                return replace_latents(result, target)
            pending = self.pending
            if pending is not None and pending.frame is call.frame and not pending.latents_done:
                result = replace_latents(result, pending.latents)
                pending.latents_done = True
                self._maybe_finish()
            return result

        return prepare_latents

    def decodes_only(self, frame) -> bool:
        """Whether `frame` is a user's call whose stages ran: its own loop runs no step."""
        return self.pending is not None and self.pending.frame is frame

    # -- the run ------------------------------------------------------------------------------
    def _maybe_run(self, call) -> None:
        arguments = call.arguments()
        height, width = arguments.get("height"), arguments.get("width")
        if height is None or width is None:
            return
        steps = arguments.get("num_inference_steps")
        request = StageRequest(int(height), int(width), steps, arguments, tuple(self.attachment.calls.parameters),
                               arguments.get("generator"))
        stages = plan_stages(self.planners, request)
        if len(stages) == 1 and stages[0].trivial:
            return  # nothing to stage: a plain call
        self._check_latents(arguments, stages)
        saved = {k: v for k, v in self.pipe.__dict__.items() if k.startswith("_") and not k.startswith("_hires")}
        self.running = True
        self._shadow_scheduler(any(s.stops_early or s.after_step for s in stages))
        try:
            self._run(arguments, stages)
        except BaseException:
            self._unshadow_scheduler()
            raise
        finally:
            self.running = False
            self.current = None
            self.pipe.__dict__.update(saved)  # the user's call set its own state before encode_prompt
        self.pending = _Pending(call.frame, self.latents.output_to_latents(stages[-1].output, self.pipe.vae))
        for stage in stages:
            stage.drop_tensors()
        self.last_run = tuple(stages)

    def _check_latents(self, arguments: dict, stages: list[Stage]) -> None:
        first = stages[0]
        if arguments.get("latents") is None or (first.start is None and (first.height, first.width) == (
                int(arguments["height"]), int(arguments["width"]))):
            return
        owners = sorted({s.owner if s.parent is None else s.parent.owner for s in stages})
        raise ValueError(f"latents= cannot be combined with {' and '.join(owners)}: its stages prepare their own "
                         "latents at other sizes; pass generator= for reproducible results")

    def _run(self, arguments: dict, stages: list[Stage]) -> None:
        call_parameters = self.attachment.calls.parameters
        previous = None
        for index, stage in enumerate(stages):
            if stage.start is not None:
                stage.x0 = stage.start(stage, previous)
            kwargs = dict(arguments)
            kwargs.update(height=stage.height, width=stage.width, output_type="latent", return_dict=False)
            if index > 0 or stage.start is not None:
                kwargs["latents"] = None
            kwargs.update({k: v for k, v in RESIZING_ARGUMENTS.items() if k in call_parameters})
            kwargs.update(stage.call_arguments)
            self.current = stage
            stage.output = self.pipe(**kwargs)[0]
            self.current = None
            if stage.stops_early:
                if stage.result is None:
                    raise RuntimeError(f"{stage.owner} stage {stage.height}x{stage.width} ran no step of its schedule")
            else:
                stage.result = self._spatial(stage.output, stage)
            if stage.parent is not None:
                stage.parent.timesteps += stage.timesteps
            # Only this stage's result is needed from here on: at 8K the guides are full-size images.
            if previous is not None:
                previous.drop_tensors()
            stage.x0 = stage.noise = None
            if hasattr(stage.data, "drop_tensors"):
                stage.data.drop_tensors()
            previous = stage

    def _after_step(self, stage: Stage, index: int, output):
        latents = output[0] if isinstance(output, tuple) else output.prev_sample
        spatial = self._spatial(latents, stage, returned=False)
        for hook in stage.after_step:
            spatial = hook(stage, index, spatial)
        return _with_latents(output, self.latents.from_spatial(spatial).to(latents.dtype))

    def _spatial(self, latents: torch.Tensor, stage: Stage, returned: bool = True) -> torch.Tensor:
        """(B, C, h, w) denoiser latents of a stage's output (`returned`: what the pipeline returned for
        output_type="latent"; else latents as the denoiser sees them)."""
        f = self.info.latent_factor
        if returned:
            return self.latents.output_to_spatial(latents, stage.height // f, stage.width // f, self.pipe.vae)
        return self.latents.to_spatial(latents, stage.height // f, stage.width // f)

    def _fill(self, stage: Stage) -> None:
        """Write the stage's start, noised to its first timestep, into the tensor its loop starts from."""
        target = stage.target
        x0 = tile_batch(stage.x0, target.shape[0]).to(target.device)
        noise = randn_tensor(x0.shape, generator=stage.generator, device=target.device, dtype=torch.float32)
        noisy = schedules.renoise(self.pipe.scheduler, x0, noise, stage.start_timestep)
        if stage.after_step:
            stage.noise = noise
        target.copy_(self.latents.from_spatial(noisy).to(target.dtype))
        stage.target = None

    def _maybe_finish(self) -> None:
        pending = self.pending
        if pending is not None and pending.schedule_done and pending.latents_done:
            pending.latents = None
            self._unshadow_scheduler()

    def call_ended(self, frame) -> None:
        """The denoising loop of the call running in `frame` has exited."""
        if self.pending is not None and self.pending.frame is frame:
            self.pending = None

    def _abandon(self) -> None:
        """Drop what a call that raised after its stages left behind."""
        self.pending = None
        self._unshadow_scheduler()

    # -- the scheduler during a run ---------------------------------------------------------
    def _shadow_scheduler(self, capture_steps: bool) -> None:
        scheduler = self.pipe.scheduler
        wrap = self.attachment.wrap_method
        self._scheduler_shadows.append(wrap(scheduler, "set_timesteps", self._wrap_set_timesteps))
        if capture_steps:
            self._scheduler_shadows.append(wrap(scheduler, "step", self._wrap_step))

    def _unshadow_scheduler(self) -> None:
        for entry in reversed(self._scheduler_shadows):
            self.attachment.unshadow(entry)
        self._scheduler_shadows.clear()

    def _wrap_set_timesteps(self, original):
        engine = self

        def set_timesteps(*args, **kwargs):
            stage = engine.current
            scheduler = engine.pipe.scheduler
            if engine.running and stage is not None:
                if stage.schedule is not None:
                    stage.schedule(stage, scheduler, original, args, kwargs)
                else:
                    original(*args, **kwargs)
                stage.timesteps = tuple(float(t) for t in scheduler.timesteps)
                stage.start_timestep = scheduler.timesteps[0] if len(scheduler.timesteps) else None
                if stage.target is not None:  # the pipeline prepared its latents first
                    engine._fill(stage)
                return
            original(*args, **kwargs)
            pending = engine.pending
            call = engine.attachment.calls.current(sys._getframe(1))
            if pending is not None and call is not None and call.frame is pending.frame and not pending.schedule_done:
                scheduler.timesteps = scheduler.timesteps[:0]  # the user's own call: it only decodes
                pending.schedule_done = True
                engine._maybe_finish()

        return set_timesteps

    def _wrap_step(self, original):
        engine = self
        names = list(inspect.signature(original).parameters)

        def step(*args, **kwargs):
            stage = engine.current
            if not engine.running or stage is None:
                return original(*args, **kwargs)
            index = stage.steps_taken
            stage.steps_taken += 1
            if stage.stops_early and stage.steps_taken == stage.steps:
                bound = dict(zip(names, args))
                bound.update(kwargs)
                stage.result = schedules.clean_estimate(engine.pipe.scheduler, engine.info.prediction_type,
                                                        bound["model_output"], bound["timestep"], bound["sample"])
                stage.result = engine._spatial(stage.result, stage, returned=False)
            output = original(*args, **kwargs)
            if stage.after_step:
                output = engine._after_step(stage, index, output)
            return output

        return step


def _with_latents(output, latents: torch.Tensor):
    """A scheduler step's output (a tuple led by the latents, or a SchedulerOutput) with new latents."""
    if isinstance(output, tuple):
        return (latents, *output[1:])
    output.prev_sample = latents
    return output


def _wrap_prepare_image(original):
    """Flux and SD3 ControlNet pipelines take a tensor control image as it is and then read the call's
    height and width from it, so every stage (and the user's call) would run at the control image's
    size; resize the tensor to the call's size instead, as they do for PIL images."""
    signature = inspect.signature(original)

    def prepare_image(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        image, size = arguments["image"], (arguments["height"], arguments["width"])
        if isinstance(image, torch.Tensor) and image.ndim == 4 and tuple(image.shape[-2:]) != size:
            arguments["image"] = F.interpolate(image, size=size, mode="bilinear", antialias=True)
        return original(**arguments)

    return prepare_image


def plan_stages(planners, request: StageRequest) -> list[Stage]:
    """The stages of a call: the trivial plan, then each (name, planner) in turn."""
    stages = [Stage(request.height, request.width, owner="call", generator=request.generator,
                    planned_steps=request.steps)]
    for _, planner in planners:
        stages = planner.plan(request, stages)
    return stages


def planner_of(pipe, name: str):
    """The planner added as `name` to the stage engine attached to `pipe`, or None."""
    engine = pipe.__dict__.get(ENGINE_ATTRIBUTE)
    return engine.planner(name) if engine is not None else None


def last_run_of(engine: StageEngine | None, owner: str) -> list[Stage] | None:
    """The stages `owner` planned in the last staged call (a stage sliced by another planner counts
    once, as its parent), or None if none ran."""
    if engine is None or engine.last_run is None:
        return None
    found = []
    for stage in engine.last_run:
        own = stage.parent if stage.parent is not None and stage.parent.owner == owner else stage
        if own.owner == owner and own not in found:
            found.append(own)
    return found or None
