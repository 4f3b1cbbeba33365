"""apply / remove, and the state of one pipeline call.

How hires attaches (DESIGN.md's patching rule):
- the denoiser gets named hooks through diffusers' `HookRegistry` (all named `hires.*`);
- attention processors, when a technique replaces them, are saved first and set back on removal;
- the pipeline object gets two instance attributes that shadow its own methods: `check_inputs`
  (to validate the requested size before any work) and `progress_bar` (every supported pipeline
  runs its denoising loop inside `with self.progress_bar(...)`, which gives a call boundary that is
  also crossed when the call raises). Pipelines are not `nn.Module`s, so no hook registry exists
  for them; deleting the two attributes restores the class's methods exactly.

Per-call state (`CallState`) is built at the first denoiser call inside that boundary, from the
latent the denoiser actually receives and the scheduler's timesteps, and dropped when the loop
exits, normally or by an exception.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import sys
import zlib
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .config import HiresConfig, validate_size
from .families import ModelInfo, read_model_info

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
    # Technique-owned per-call values (e.g. guidance momentum), dropped with the call. Keys starting
    # with "log." are kept in `hires.last_call(pipe).notes` for inspection.
    scratch: dict[str, Any] = dataclasses.field(default_factory=dict)

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
        if family.guidance_layout == "separate" and not self.call_locals.get("do_true_cfg", False):
            return None
        scale = self.call_locals.get(family.guidance_scale_name)
        return None if scale is None or scale <= 1 else float(scale)

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

    def __init__(self, attachment: "Attachment", bar, call_locals: dict[str, Any]):
        self.attachment = attachment
        self.bar = bar
        self.call_locals = call_locals

    def __enter__(self):
        self.attachment.begin_call(self.call_locals)
        return self.bar.__enter__()

    def __exit__(self, exc_type, exc, tb):
        try:
            return self.bar.__exit__(exc_type, exc, tb)
        finally:
            self.attachment.end_call(completed=exc_type is None)


class Attachment:
    """Everything hires attached to one pipeline, so `remove` can take all of it out."""

    def __init__(self, pipe, config: HiresConfig, info: ModelInfo):
        self.pipe = pipe
        self.config = config
        self.info = info
        self.denoiser: torch.nn.Module = getattr(pipe, info.family.denoiser_attr)
        self.state: CallState | None = None
        self.last_call: CallRecord | None = None
        self._in_call = False
        self._call_timesteps: torch.Tensor | None = None
        self._call_locals: dict[str, Any] = {}
        self._hooks: list[_ModuleHookRecord] = []
        self._saved_processors: list[tuple[torch.nn.Module, dict]] = []
        self._saved_pipe_attrs: dict[str, tuple[bool, Any]] = {}
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

    def wrap_pipe_method(self, name: str, make_wrapper) -> None:
        """Shadow a pipeline method with `make_wrapper(original)` on the instance; `remove` restores it."""
        pipe = self.pipe
        if name not in self._saved_pipe_attrs:  # a second wrapper of the same method must not save the first
            self._saved_pipe_attrs[name] = (name in pipe.__dict__, pipe.__dict__.get(name))
        original = getattr(pipe, name)
        pipe.__dict__[name] = functools.update_wrapper(make_wrapper(original), original)

    def wraps(self, name: str) -> bool:
        """Whether a technique already shadows pipeline method `name`."""
        return name in self._saved_pipe_attrs

    def wrap_pipe_method_beneath(self, name: str, make_wrapper, make_outer) -> None:
        """Put `make_wrapper(original)` under the present shadow of `name`, rebuilt by `make_outer`: a
        wrapper that reads its caller's frame must stay the one __call__ calls. `remove` still
        restores the class's method (the first saved state of the name is kept)."""
        pipe = self.pipe
        method = pipe.__dict__[name].__wrapped__  # the pipeline's own bound method
        inner = functools.update_wrapper(make_wrapper(method), method)
        pipe.__dict__[name] = functools.update_wrapper(make_outer(inner), method)

    def attach(self) -> None:
        for technique in self.config.enabled_subconfigs():
            module_name, _, function = technique.installer.partition(":")
            getattr(importlib.import_module(module_name), function)(self, technique)
        # Registered last, so it is the outermost hook: the state is current before technique hooks run.
        self.add_hook(self.denoiser, _CallStateHook(self), CALL_STATE_HOOK)
        self.wrap_pipe_method("check_inputs", self._make_check_inputs)
        self.wrap_pipe_method("progress_bar", self._make_progress_bar)

    def detach(self) -> None:
        for record in reversed(self._hooks):
            record.detach()
        self._hooks.clear()
        for model, processors in reversed(self._saved_processors):
            model.set_attn_processor(dict(processors))
        self._saved_processors.clear()
        for name, (had, value) in self._saved_pipe_attrs.items():
            if had:
                self.pipe.__dict__[name] = value
            else:
                self.pipe.__dict__.pop(name, None)
        self._saved_pipe_attrs.clear()
        self.state = None

    # -- the call boundary -----------------------------------------------------------------
    def pipeline_call_frame(self, frame):
        """The pipeline's own __call__ (any class of its MRO) if `frame` runs it, else None."""
        for cls in type(self.pipe).__mro__:
            function = cls.__dict__.get("__call__")
            if function is not None and inspect.unwrap(function).__code__ is frame.f_code:
                return inspect.unwrap(function)
        return None

    def _make_check_inputs(self, original):
        signature = inspect.signature(original)

        def check_inputs(*args, **kwargs):
            caller = sys._getframe(1)
            call = self.pipeline_call_frame(caller)
            if call is not None:
                # Some pipelines (PixArt-Sigma) accept **kwargs and drop them silently; a misspelt
                # argument would then be ignored. Their __call__ is the frame that called us.
                parameters = inspect.signature(call).parameters.values()
                var_keyword = next((p.name for p in parameters if p.kind is p.VAR_KEYWORD), None)
                swallowed = caller.f_locals.get(var_keyword) if var_keyword else None
                if swallowed:
                    raise TypeError(
                        f"{type(self.pipe).__name__}.__call__ got unknown keyword argument(s) "
                        f"{', '.join(f'{k}={v!r}' for k, v in swallowed.items())}; valid arguments are: "
                        f"{', '.join(p.name for p in parameters if p.name not in ('self', var_keyword))}"
                    )
            bound = signature.bind_partial(*args, **kwargs).arguments
            for side in ("height", "width"):
                if bound.get(side) is not None:
                    validate_size(side, bound[side], self.info.size_multiple, self.info.name)
            return original(*args, **kwargs)

        return check_inputs

    def _make_progress_bar(self, original):
        def progress_bar(iterable=None, total=None):
            bar = original(iterable=iterable, total=total)
            if iterable is not None:
                return bar
            # The denoising loop of __call__ opens the bar: its frame holds the resolved arguments.
            caller = sys._getframe(1)
            values = caller.f_locals if self.pipeline_call_frame(caller) is not None else {}
            return _CallScope(self, bar, {k: values[k] for k in _CALL_LOCALS if k in values})

        return progress_bar

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
                notes={k: v for k, v in state.scratch.items() if k.startswith("log.")},
            )
        self._in_call = False
        self.state = None
        self._call_timesteps = None
        self._call_locals = {}

    def on_denoiser_call(self, module, args, kwargs) -> None:
        if not self._in_call:
            return  # the denoiser was called outside a pipeline loop: hires stays out of it
        arguments = self._forward_signature.bind_partial(module, *args, **kwargs).arguments
        if self.state is None:
            self.state = self._new_state(arguments)
        timestep = arguments.get("timestep")
        if timestep is not None and self.state.num_steps:
            self.state.step_index = self._step_index(timestep)
        else:
            self.state.step_index += 1
        self.state.steps_seen.append(self.state.step_index)

    def _new_state(self, arguments: dict) -> CallState:
        info = self.info
        latents = next(iter(v for k, v in arguments.items() if k != "self"))
        if info.family.latent_layout == "packed":
            # Packed latents carry their grid in img_ids (row in column 1, column in column 2).
            ids = arguments["img_ids"]
            ids = ids[0] if ids.ndim == 3 else ids
            rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
            latent_h, latent_w = rows * info.patch_size, cols * info.patch_size
        else:
            latent_h, latent_w = latents.shape[-2:]
        height, width = int(latent_h) * info.latent_factor, int(latent_w) * info.latent_factor
        validate_size("height", height, info.size_multiple, info.name)
        validate_size("width", width, info.size_multiple, info.name)
        timesteps = self._call_timesteps if self._call_timesteps is not None else torch.zeros(0, dtype=torch.float64)
        return CallState(info=info, height=height, width=width, timesteps=timesteps, call_locals=self._call_locals)

    def _step_index(self, timestep) -> int:
        t = torch.as_tensor(timestep).detach().flatten()[0].double().cpu() / self.info.family.timestep_input_scale
        return int(torch.argmin((self.state.timesteps - t).abs()))


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
    info = read_model_info(pipe)  # raises TypeError for unsupported pipelines
    if config is None:
        from .presets import automatic_config

        config = automatic_config(info)
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


def remove(pipe):
    """Take everything hires attached out of `pipe`; a no-op on a pipeline never applied."""
    attachment = pipe.__dict__.pop(_ATTACHMENT_ATTR, None)
    if attachment is not None:
        attachment.detach()
    return pipe


def model_info(pipe) -> ModelInfo:
    """The family and the facts hires reads from `pipe`'s configs (works without `apply`)."""
    return read_model_info(pipe)


def last_call(pipe) -> CallRecord | None:
    """Summary of the last finished call of an applied pipeline (None if none ran)."""
    attachment = get_attachment(pipe)
    return None if attachment is None else attachment.last_call
