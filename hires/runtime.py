"""apply / remove, and the state of one pipeline call.

How hires attaches (DESIGN.md's patching rule):
- the denoiser gets named hooks through diffusers' `HookRegistry` (all named `hires.*`);
- attention processors, when a technique replaces them, are saved first and set back on removal;
- the pipeline object gets two instance attributes that shadow its own methods: `check_inputs`
  (to validate the requested size before any work) and `progress_bar` (every supported pipeline
  runs its denoising loop inside `with self.progress_bar(...)`, which gives a call boundary that is
  also crossed when the call raises). Pipelines are not `nn.Module`s, so no hook registry exists
  for them; deleting the two attributes restores the class's methods exactly. A Modular Diffusers pipeline
  has neither: each denoise loop block's `progress_bar` is shadowed instead, and its graph's denoise entry
  runs the stages (hires.modular);
- the finite-output guard (hires.guards) checks the loop's final latents as that boundary closes
  and shadows `image_processor.postprocess` to check the decoded image, one ledger entry.

Per-call state (`CallState`) is built at the first denoiser call inside that boundary, from the
latent the denoiser actually receives and the scheduler's timesteps, and dropped when the loop
exits, normally or by an exception.

One owner per question:
- `PipelineCalls` answers "is this frame the user's call of this pipeline, and what were its
  arguments" for plain pipelines, subclasses, the ready pipelines and community pipelines;
- the attachment's ledger (`shadow` / `wrap_method` / `unshadow`) is the only way hires overrides
  an attribute of the pipeline, its scheduler or a module, so `remove` restores from one list;
- the catalogue (`hires.techniques`) lists the techniques' records (config type, installer, order,
  relations), extensions registered with `hires.registry.register` beside them; installers run in
  record order.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import zlib
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from . import guards, modular, registry
from .config import HiresConfig, validate_size
from .families import ModelInfo, pipeline_module, read_model_info
from .sampling.latents import adapter_for
from .sampling.stages import StageEngine, StageRequest, plan_stages
from .techniques import all_techniques

HOOK_PREFIX = "hires."
CALL_STATE_HOOK = HOOK_PREFIX + "call_state"
_ATTACHMENT_ATTR = "_hires_attachment"
# Values of the pipeline's __call__ that techniques read, as the pipeline resolved them.
_CALL_LOCALS = ("generator", "guidance_scale", "true_cfg_scale", "do_true_cfg", "num_inference_steps")


@dataclasses.dataclass
class CallState:
    """What hooks know about the running call. Created per call, dropped after it."""

    info: ModelInfo
    height: int  # pixels, as denoised (after any pipeline-side resizing)
    width: int
    timesteps: torch.Tensor  # the scheduler's timesteps for this call (float64, CPU)
    step_index: int = -1  # index into `timesteps` of the current denoiser call
    steps_seen: list[int] = dataclasses.field(default_factory=list)
    # The pipeline __call__'s own values of _CALL_LOCALS (those it has), read when the loop starts.
    call_locals: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The stage engine's stage this call runs (None for a call that is not a stage), and the per-stage
    # settings it pushed, by their type (read with `stage_setting`).
    stage: Any = None
    stage_settings: dict[type, Any] = dataclasses.field(default_factory=dict)
    # Notes kept in `hires.last_call(pipe).notes` for inspection (key "log.<technique>...").
    log: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Tokens the denoiser's image sequence carries after the image itself (Flux.2's reference images).
    trailing_tokens: int = 0
    _slots: dict[type, Any] = dataclasses.field(default_factory=dict)

    def stage_setting(self, kind: type):
        """The setting of type `kind` the stage engine pushed onto this stage's call (e.g. an APGConfig
        of StructureGuidanceConfig.apg), or None."""
        return self.stage_settings.get(kind)

    def slot(self, kind: type):
        """This call's instance of a technique's per-call dataclass `kind`, created on first use."""
        value = self._slots.get(kind)
        if value is None:
            value = self._slots[kind] = kind()
        return value

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def scale_height(self) -> float:
        return self.height / self.info.base_height

    @property
    def scale_width(self) -> float:
        return self.width / self.info.base_width

    @property
    def area_scale(self) -> float:
        return self.scale_height * self.scale_width

    @property
    def latent_height(self) -> int:
        return self.height // self.info.latent_factor

    @property
    def latent_width(self) -> int:
        return self.width // self.info.latent_factor

    @property
    def tokens(self) -> int:
        """Image tokens (latent pixels for UNets) at this call's size."""
        unit = self.info.token_side
        return (self.height // unit) * (self.width // unit)

    def step_fraction(self) -> float:
        """Position of the current step in the schedule: 0 at the first step, 1 past the last."""
        return max(self.step_index, 0) / max(self.num_steps, 1)

    @property
    def guidance_scale(self) -> float | None:
        """The classifier-free guidance scale the pipeline combines with (None if not running CFG)."""
        family = self.info.family
        if not family.runs_cfg:
            return None
        if family.cfg_separate and family.cfg_switch and not self.call_locals.get(family.cfg_switch, False):
            return None
        scale = self.call_locals.get(family.guidance_scale_name)
        if scale is None:
            return None
        # w in uncond + w (cond - uncond); Z-Image's cond + s (cond - uncond) runs CFG for any s > 0
        weight = float(scale) + family.guidance_scale_offset
        return weight if weight > 1 else None

    def generator(self, purpose: str) -> torch.Generator:
        """A generator for `purpose` (e.g. "windows") derived from the call's own generator.

        It is seeded from the call generator's seed without drawing from it, so the pipeline's own
        random numbers are unchanged and the same seed gives the same image.
        """
        call_generator = self.call_locals.get("generator")
        if isinstance(call_generator, (list, tuple)):
            call_generator = call_generator[0] if call_generator else None
        seed = call_generator.initial_seed() if call_generator is not None else torch.initial_seed()
        derived = torch.Generator("cpu")
        derived.manual_seed((seed * 1_000_003 + zlib.crc32(purpose.encode())) % (2**63))
        return derived


@dataclasses.dataclass(frozen=True)
class CallRecord:
    """A read-only summary of the last finished call, for inspection and logging."""

    height: int
    width: int
    steps_seen: tuple[int, ...]
    completed: bool
    notes: dict[str, Any]


class _ModuleHookRecord:
    """One hook hires registered, and what the module looked like before, to leave no trace."""

    def __init__(self, module: torch.nn.Module, name: str):
        self.module = module
        self.name = name
        self.had_registry = hasattr(module, "_diffusers_hook")
        self.had_forward_attr = "forward" in module.__dict__
        self.wrapper = None  # the module.forward our registration installed

    def detach(self) -> None:
        module = self.module
        registry = module._diffusers_hook
        outer = module.__dict__.get("forward")
        # accelerate's offload hooks (added after apply) wrap module.forward and call module._old_forward.
        wrapped_by_accelerate = outer is not self.wrapper and module.__dict__.get("_old_forward") is self.wrapper
        if wrapped_by_accelerate:
            module.forward = self.wrapper
        registry.remove_hook(self.name, recurse=False)
        if wrapped_by_accelerate:
            module._old_forward = module.forward
            module.forward = outer
        elif not self.had_forward_attr and module.__dict__.get("forward") == type(module).forward.__get__(module):
            del module.__dict__["forward"]
        if not self.had_registry and not registry.hooks:
            del module._diffusers_hook


class PipelineCall:
    """One running `__call__` of the pipeline: its frame, the function it runs and its arguments."""

    def __init__(self, frame, function):
        self.frame = frame
        self.function = function
        self.parameters = inspect.signature(function).parameters

    @property
    def locals(self) -> dict[str, Any]:
        """The frame's locals now: arguments as the pipeline has resolved them so far."""
        return self.frame.f_locals

    def arguments(self) -> dict[str, Any]:
        """The named parameters of the call (no self, *args or **kwargs) with their current values."""
        values = self.frame.f_locals
        return {name: values[name] for name, p in self.parameters.items()
                if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name in values}

    def swallowed_keywords(self) -> dict[str, Any]:
        """What the call's **kwargs caught (pipelines such as PixArt-Sigma accept and drop them)."""
        name = next((n for n, p in self.parameters.items() if p.kind is p.VAR_KEYWORD), None)
        return dict(self.frame.f_locals.get(name) or {}) if name else {}


class PipelineCalls:
    """The one answer to "which frame is this pipeline's call": the nearest frame that runs any
    `__call__` of the pipeline's class hierarchy on this very pipeline object. A ready pipeline's
    wrapper (`HiresPipelineMixin.__call__`) calls its diffusers base class, whose frame is the nearer
    one, so plain pipelines, subclasses, ready and community pipelines are found the same way."""

    def __init__(self, pipe):
        self.pipe = pipe
        self._functions = {}
        for cls in type(pipe).__mro__:
            function = cls.__dict__.get("__call__")
            if function is not None:
                function = inspect.unwrap(function)
                self._functions[function.__code__] = function

    @functools.cached_property
    def parameters(self) -> list[str]:
        """Named parameters of the pipeline's own __call__: the nearest in the class hierarchy that
        takes a size (a ready pipeline's wrapper takes only *args, **kwargs)."""
        for function in self._functions.values():
            params = inspect.signature(function).parameters
            names = [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
            if "height" in names:
                return names
        return []

    def current(self, frame=None) -> PipelineCall | None:
        """The innermost pipeline call at or above `frame` (default: the caller's frame), or None."""
        frame = frame if frame is not None else sys._getframe(1)
        while frame is not None:
            function = self._functions.get(frame.f_code)
            if function is not None and frame.f_locals.get("self") is self.pipe:
                return PipelineCall(frame, function)
            frame = frame.f_back
        return None

    def called_by(self, frame) -> PipelineCall | None:
        """The pipeline call if `frame` itself runs it (a method called directly from `__call__`)."""
        function = self._functions.get(frame.f_code)
        if function is not None and frame.f_locals.get("self") is self.pipe:
            return PipelineCall(frame, function)
        return None


@dataclasses.dataclass
class _Shadow:
    owner: Any
    name: str
    had: bool  # whether the name was in owner.__dict__ before
    before: Any
    value: Any


class _CallStateHook(ModelHook):
    """Builds the call's state at the first denoiser call and tracks the current step."""

    def __init__(self, attachment: "Attachment"):
        super().__init__()
        self.attachment = attachment

    def pre_forward(self, module, *args, **kwargs):
        self.attachment.on_denoiser_call(module, args, kwargs)
        return args, kwargs


class _CallScope:
    """Wraps the pipeline's own progress bar: entering starts a call, exiting ends it."""

    def __init__(self, attachment: "Attachment", bar, call_locals: dict[str, Any], frame):
        self.attachment = attachment
        self.bar = bar
        self.call_locals = call_locals
        self.frame = frame

    def __enter__(self):
        self.attachment.begin_call(self.call_locals)
        return self.bar.__enter__()

    def __exit__(self, exc_type, exc, tb):
        completed = False
        try:
            result = self.bar.__exit__(exc_type, exc, tb)
            if exc_type is None:  # before any decode: non-finite latents raise (one reduction per call)
                guards.check_latents(self.attachment, self.frame, self.call_locals)
                completed = True
            return result
        finally:
            self.attachment.end_call(completed=completed)
            if self.attachment.stages is not None:
                self.attachment.stages.call_ended(self.frame)
            self.frame = None


class _RequestedArea:
    """The `math` module as HiDreamImagePipeline's own module sees it while hires is attached with a technique on:
    the square root its __call__ takes of base area / requested area, to rescale every request to the base area,
    is 1 for that pipeline's calls (so it denoises the size asked for), and its transformer pads a non-square
    grid to at least that grid's own token count for the call (Family.resizes_to_base_area). The request is
    checked there, before the pipeline floors it. Other callers and other pipelines get the real math."""

    def __init__(self, attachment: "Attachment", module):
        self.attachment = attachment
        self.module = module

    def __getattr__(self, name):
        return getattr(self.module, name)

    def sqrt(self, value):
        attachment = self.attachment
        call = attachment.calls.called_by(sys._getframe(1))
        if call is None:
            return self.module.sqrt(value)
        arguments = call.locals
        for side in ("height", "width"):  # the request as given: the pipeline is about to floor it to 16
            validate_size(side, arguments[side], attachment.info.size_multiple, attachment.info.name)
        if not attachment.techniques:
            return self.module.sqrt(value)
        height, width = int(arguments["height"]), int(arguments["width"])
        patch = attachment.info.token_side
        tokens = (height // patch) * (width // patch)
        denoiser = attachment.denoiser
        if height != width and tokens > denoiser.max_seq:
            attachment.call_shadows.append(attachment.shadow(denoiser, "max_seq", tokens))
        return 1.0


class Attachment:
    """Everything hires attached to one pipeline, so `remove` can take all of it out."""

    def __init__(self, pipe, config: HiresConfig, info: ModelInfo):
        self.pipe = pipe
        self.config = config
        self.info = info
        self.denoiser: torch.nn.Module = getattr(pipe, info.family.denoiser_attr)
        self.calls = PipelineCalls(pipe)
        self.state: CallState | None = None
        self.last_call: CallRecord | None = None
        self.stages = None  # the stage engine (hires.sampling.stages), when a staged technique is on
        self.latents = adapter_for(info)  # between the denoiser's latents and (B, C, h, w) (hires.sampling.latents)
        self.techniques: list[tuple[registry.Technique, Any]] = []  # enabled (record, config), in order
        self.estimate_adaptations: tuple = ()  # for the memory planner's estimates (Technique.adapts_estimate)
        self._in_call = False
        self._call_timesteps: torch.Tensor | None = None
        self._call_locals: dict[str, Any] = {}
        self._hooks: list[_ModuleHookRecord] = []
        self._saved_processors: list[tuple[torch.nn.Module, dict]] = []
        self._shadows: list[_Shadow] = []
        self._undo: list = []  # what `detach` calls besides the ledger (a modular pipeline's graph edit)
        self.call_shadows: list[_Shadow] = []  # undone as the call that set them ends
        self._forward_signature = inspect.signature(type(self.denoiser).forward)

    # -- attaching -------------------------------------------------------------------------
    def add_hook(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        if not name.startswith(HOOK_PREFIX):
            raise ValueError(f"hook name {name!r} must start with {HOOK_PREFIX!r} so remove() finds it")
        record = _ModuleHookRecord(module, name)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        record.wrapper = module.__dict__.get("forward")
        self._hooks.append(record)

    def set_attn_processors(self, model: torch.nn.Module, processors: dict) -> None:
        """Replace attention processors, saving the originals once for `remove`."""
        if not any(saved_model is model for saved_model, _ in self._saved_processors):
            self._saved_processors.append((model, dict(model.attn_processors)))
        model.set_attn_processor(dict(processors))

    # -- the ledger of shadowed attributes -------------------------------------------------
    def shadow(self, owner, name: str, value) -> _Shadow:
        """Set `owner.__dict__[name] = value`; `unshadow` or `remove` puts back what was there."""
        entry = _Shadow(owner, name, name in owner.__dict__, owner.__dict__.get(name), value)
        owner.__dict__[name] = value
        self._shadows.append(entry)
        return entry

    def wrap_method(self, owner, name: str, make_wrapper) -> _Shadow:
        """Shadow method `name` of `owner` with `make_wrapper(current method)` on the instance."""
        original = getattr(owner, name)
        wrapper = functools.update_wrapper(make_wrapper(original), original)
        return self.shadow(owner, name, wrapper)

    def unshadow(self, entry: _Shadow) -> None:
        """Undo one shadow now (a no-op if it was undone already)."""
        if entry not in self._shadows:
            return
        self._shadows.remove(entry)
        owner = entry.owner
        if owner.__dict__.get(entry.name) is not entry.value:
            return  # replaced meanwhile by someone else: theirs stays
        # A shadow set later on the same name that is still in place keeps covering ours.
        if entry.had:
            owner.__dict__[entry.name] = entry.before
        else:
            owner.__dict__.pop(entry.name, None)

    def on_detach(self, undo) -> None:
        """Call `undo()` when hires is removed (for a change that is no attribute: a block graph entry)."""
        self._undo.append(undo)

    def enabled_with(self, capability: str) -> list[str]:
        """Names of the enabled techniques that declare `capability` (hires.registry.CAPABILITIES)."""
        return [record.name for record, _ in self.techniques if capability in record.capabilities]

    def attach(self) -> None:
        self._check_modules_not_shared()
        self.techniques = installed_techniques(self.config)
        self.estimate_adaptations = estimate_adaptations(self.info, self.config)
        view = self.latents.denoiser_view()  # a denoiser that does not take tensors (Z-Image's list of latents)
        if view is not None:  # innermost: back to the denoiser's own form
            self.add_hook(self.denoiser, *view[0])
        planners = [(record.name, record.make_planner(self.info, sub, self)) for record, sub in self.techniques
                    if record.planner is not None]
        is_modular = modular.is_modular(self.pipe)
        if planners:
            self.stages = StageEngine(self, entry_points=not is_modular)
            for name, planner in planners:
                self.stages.add_planner(name, planner)
        for record, sub in self.techniques:
            install = record.installer()
            if install is not None:
                install(self, sub)
        # Registered last, so it is the outermost hook: the state is current before technique hooks run.
        self.add_hook(self.denoiser, _CallStateHook(self), CALL_STATE_HOOK)
        if view is not None and view[1] is not None:  # outside everything: every hires hook sees the tensor view
            self.add_hook(self.denoiser, *view[1])
        if is_modular:  # the loop blocks' progress bars, and a stages block on the graph (hires.modular)
            modular.attach(self, lambda bar, call_locals, loop: _CallScope(self, bar, call_locals, loop))
        else:
            if hasattr(type(self.pipe), "check_inputs"):  # ZImagePipeline has none: it checks sizes itself, first
                self.wrap_method(self.pipe, "check_inputs", self._make_check_inputs)
            self.wrap_method(self.pipe, "progress_bar", self._make_progress_bar)
        guards.install(self)  # decoded images are checked before the pipeline turns them into its output
        if self.info.family.resizes_to_base_area:
            module = pipeline_module(self.pipe, self.info.family)
            self.shadow(module, "math", _RequestedArea(self, module.math))

    def _check_modules_not_shared(self) -> None:
        """Pipelines made with `from_pipe` share their modules; one module carries one attachment's hooks."""
        for module in (self.denoiser, getattr(self.pipe, "vae", None)):
            registry_ = getattr(module, "_diffusers_hook", None) if module is not None else None
            if registry_ is not None and any(n.startswith(HOOK_PREFIX) for n in registry_.hooks):
                raise ValueError(
                    f"{type(module).__name__} of this {type(self.pipe).__name__} "
                    f"already carries hires hooks of another "
                    "pipeline (pipelines made with from_pipe share their modules); call hires.remove() on the other "
                    "pipeline first, or give this one its own copy of the module")

    def detach(self) -> None:
        for record in reversed(self._hooks):
            record.detach()
        self._hooks.clear()
        for model, processors in reversed(self._saved_processors):
            model.set_attn_processor(dict(processors))
        self._saved_processors.clear()
        for entry in reversed(list(self._shadows)):
            self.unshadow(entry)
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.state = None

    # -- the call boundary -----------------------------------------------------------------
    def _make_check_inputs(self, original):
        signature = inspect.signature(original)

        def check_inputs(*args, **kwargs):
            call = self.calls.called_by(sys._getframe(1))
            swallowed = call.swallowed_keywords() if call is not None else {}
            if swallowed:
                # Some pipelines (PixArt-Sigma) accept **kwargs and drop them silently; a misspelt
                # argument would then be ignored.
                valid = [n for n, p in call.parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD]
                raise TypeError(
                    f"{type(self.pipe).__name__}.__call__ got unknown keyword argument(s) "
                    f"{', '.join(f'{k}={v!r}' for k, v in swallowed.items())}; valid arguments are: {', '.join(valid)}"
                )
            guards.check_arguments(call)
            bound = signature.bind_partial(*args, **kwargs).arguments
            for side in ("height", "width"):
                if bound.get(side) is not None:
                    validate_size(side, bound[side], self.info.size_multiple, self.info.name)
            height, width = bound.get("height"), bound.get("width")
            base_area = self.info.base_height * self.info.base_width
            if height is not None and width is not None and height * width > base_area:
                self.check_memory_floor(height, width)
            return original(*args, **kwargs)

        return check_inputs

    def check_memory_floor(self, height: int, width: int) -> None:
        """Above the base size, refuse before any work a size that cannot fit whatever hires does."""
        from .config import parse_bytes
        from .techniques.memory.estimate import check_request

        memory = self.config.memory
        budget = parse_bytes(memory.max_memory, "MemoryConfig.max_memory") if memory.enabled and memory.max_memory \
            else None
        check_request(height, width, self.pipe._execution_device, budget, f"{type(self.pipe).__name__}.__call__")

    def _make_progress_bar(self, original):
        def progress_bar(iterable=None, total=None):
            call = self.calls.called_by(sys._getframe(1))
            decodes_only = call is not None and self.stages is not None and self.stages.decodes_only(call.frame)
            if iterable is None and decodes_only:
                bar = self._silent(original, total)  # its stages showed the steps; an empty bar would not
            else:
                bar = original(iterable=iterable, total=total)
            if iterable is not None:
                return bar
            # The denoising loop of __call__ opens the bar: its frame holds the resolved arguments.
            values = call.locals if call is not None else {}
            return _CallScope(self, bar, {k: values[k] for k in _CALL_LOCALS if k in values},
                              call.frame if call is not None else None)

        return progress_bar

    def _silent(self, original, total):
        """The pipeline's own bar, disabled (its progress-bar config is put back as it was)."""
        config = {**(getattr(self.pipe, "_progress_bar_config", None) or {}), "disable": True}
        entry = self.shadow(self.pipe, "_progress_bar_config", config)
        try:
            return original(total=total)
        finally:
            self.unshadow(entry)

    def begin_call(self, call_locals: dict[str, Any] | None = None) -> None:
        self._in_call = True
        self.state = None
        self._call_locals = dict(call_locals or {})
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        self._call_timesteps = None if timesteps is None else torch.as_tensor(timesteps).detach().cpu().double()

    def end_call(self, completed: bool) -> None:
        state = self.state
        if state is not None:
            self.last_call = CallRecord(
                height=state.height,
                width=state.width,
                steps_seen=tuple(state.steps_seen),
                completed=completed,
                notes=dict(state.log),
            )
        self._in_call = False
        self.state = None
        self._call_timesteps = None
        for entry in reversed(self.call_shadows):
            self.unshadow(entry)
        self.call_shadows.clear()
        self._call_locals = {}

    def on_denoiser_call(self, module, args, kwargs) -> None:
        if not self._in_call:
            return  # the denoiser was called outside a pipeline loop: hires stays out of it
        arguments = self._forward_signature.bind_partial(module, *args, **kwargs).arguments
        if self.state is None:
            self.state = self._new_state(arguments)
        timestep = arguments.get(self.info.family.timestep_argument)
        if timestep is not None and self.state.num_steps:
            self.state.step_index = self._step_index(timestep)
        else:
            self.state.step_index += 1
        self.state.steps_seen.append(self.state.step_index)

    def _new_state(self, arguments: dict) -> CallState:
        info = self.info
        # trailing: image-sequence tokens after the image's own (Flux.2's reference images)
        latent_h, latent_w, trailing = self.latents.grid(arguments)
        height, width = int(latent_h) * info.latent_factor, int(latent_w) * info.latent_factor
        validate_size("height", height, info.size_multiple, info.name)
        validate_size("width", width, info.size_multiple, info.name)
        timesteps = self._call_timesteps if self._call_timesteps is not None else torch.zeros(0, dtype=torch.float64)
        stage = self.stages.current if self.stages is not None else None
        return CallState(info=info, height=height, width=width, timesteps=timesteps, call_locals=self._call_locals,
                         stage=stage, stage_settings=dict(stage.settings) if stage is not None else {},
                         trailing_tokens=trailing)

    def _step_index(self, timestep) -> int:
        t = torch.as_tensor(timestep).detach().flatten()[0].double().cpu() / self.info.family.timestep_input_scale
        return int(torch.argmin((self.state.timesteps - t).abs()))


def stage_plan(info: ModelInfo, config: HiresConfig, request: StageRequest) -> list:
    """The stages a call of `request` runs with `config`, planned without a pipeline (a dry run): the
    same planners, in the same order, as an applied pipeline's call."""
    planners = [(record.name, record.make_planner(info, sub)) for record, sub in installed_techniques(config)
                if record.planner is not None]
    return plan_stages(planners, request)


def estimate_adaptations(info: ModelInfo, config: HiresConfig) -> tuple:
    """What the memory planner's meta-device denoiser must do to run as the techniques `config` installs
    make the real one run (Technique.adapts_estimate), in install order."""
    found = (record.estimate_adaptation(info, sub) for record, sub in installed_techniques(config))
    return tuple(adaptation for adaptation in found if adaptation is not None)


def installed_techniques(config: HiresConfig) -> list[tuple[registry.Technique, Any]]:
    """(record, config) of every technique `config` installs, in install order: the enabled ones, and those
    only another technique's per-stage settings switch on (StructureGuidanceConfig.apg), which install
    with their own, disabled, config and act in those stages only."""
    staged = config.stage_settings()
    found = []
    for record in all_techniques():
        sub = config.technique_config(record)
        if sub is None:
            continue
        if sub.enabled or any(entry.enabled for entry in staged.get(record.name, ())):
            found.append((record, sub))
    return found


def get_attachment(pipe) -> Attachment | None:
    return pipe.__dict__.get(_ATTACHMENT_ATTR)


def is_applied(pipe) -> bool:
    """Whether hires is attached to `pipe`."""
    return get_attachment(pipe) is not None


def apply(pipe, config: HiresConfig | None = None):
    """Attach hires to a diffusers pipeline and return it. Applying again replaces the old config.

    `config=None` picks the automatic preset for the pipeline's family (hires.presets); an
    explicit config always wins, and `HiresConfig()` turns every technique off.
    """
    if config is not None and not isinstance(config, HiresConfig):
        raise TypeError(f"config={config!r} must be a hires.HiresConfig (or None for the automatic preset)")
    base_size = None if config is None else config.base_size
    # TypeError if unsupported; a modular pipeline's CFG facts come from its guider
    info = modular.modular_info(pipe, base_size) if modular.is_modular(pipe) else read_model_info(pipe, base_size)
    if config is None:
        from .presets import automatic_config

        config = automatic_config(info)
    if modular.is_modular(pipe):
        modular.check_guider(pipe, config)
    config.validate_for(info)
    remove(pipe)
    attachment = Attachment(pipe, config, info)
    try:
        attachment.attach()
    except BaseException:
        attachment.detach()
        raise
    pipe.__dict__[_ATTACHMENT_ATTR] = attachment
    return pipe


def _check_pipeline(pipe, function: str) -> None:
    from diffusers import DiffusionPipeline

    if not isinstance(pipe, DiffusionPipeline) and not modular.is_modular(pipe):
        raise TypeError(f"hires.{function}(pipe={pipe!r}): pipe must be a diffusers pipeline (a DiffusionPipeline "
                        f"such as StableDiffusionPipeline, or a Modular Diffusers ModularPipeline such as "
                        f"StableDiffusionXLModularPipeline), not {type(pipe).__name__}")


def remove(pipe):
    """Take everything hires attached out of `pipe`; a no-op on a pipeline never applied."""
    _check_pipeline(pipe, "remove")
    attachment = pipe.__dict__.pop(_ATTACHMENT_ATTR, None)
    if attachment is not None:
        attachment.detach()
    return pipe


def model_info(pipe) -> ModelInfo:
    """The family and the facts hires reads from `pipe`'s configs (works without `apply`)."""
    return modular.modular_info(pipe) if modular.is_modular(pipe) else read_model_info(pipe)


def last_call(pipe) -> CallRecord | None:
    """Summary of the last finished call of an applied pipeline (None if none ran, or if the last call ran no
    denoiser step, as a strength-0 upscale does)."""
    _check_pipeline(pipe, "last_call")
    attachment = get_attachment(pipe)
    return None if attachment is None else attachment.last_call
