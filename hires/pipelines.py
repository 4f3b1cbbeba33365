"""Ready pipelines: diffusers pipeline classes with hires built in.

    pipe = hires.HiresStableDiffusionXLPipeline.from_pretrained(path)   # or .from_pipe(existing)
    image = pipe(prompt, height=4096, width=4096, hires_config=hires.HiresConfig(...)).images[0]

Each class is its diffusers base class plus one call argument, `hires_config`. Without it, the
config of the last call stays (the first call uses the family's automatic preset, hires.presets;
`hires_config=HiresConfig()` turns every technique off). Being their own `__call__`,
they also reject sizes diffusers would silently replace (0 means "default" to diffusers).

The Modular Diffusers pipeline classes have theirs too, loaded as diffusers loads them:

    pipe = hires.HiresFlux3ModularPipeline.from_pretrained(path)   # or (blocks=..., ...) as the base class
    pipe.load_components(torch_dtype=torch.bfloat16)
    images = pipe(prompt=..., height=2048, width=2048, output="images", hires_config=hires.HiresConfig(...))
"""

from __future__ import annotations

import inspect

import diffusers

from .config import HiresConfig, validate_size
from .families import FAMILIES, ready_class_name, ready_classes
from .runtime import apply, get_attachment


def _attach(pipe, hires_config: HiresConfig | None):
    """hires on `pipe` with `hires_config`, or with the config it has (the automatic preset at first)."""
    attachment = get_attachment(pipe)
    if hires_config is not None and (attachment is None or attachment.config != hires_config):
        apply(pipe, hires_config)
    elif attachment is None:
        apply(pipe)
    return get_attachment(pipe).info


class HiresPipelineMixin:
    def __call__(self, *args, hires_config: HiresConfig | None = None, **kwargs):
        info = _attach(self, hires_config)
        # By name or by position: diffusers turns height=0 into its default size before hires sees it.
        base_call = super().__call__
        try:
            given = inspect.signature(base_call).bind_partial(*args, **kwargs).arguments
        except TypeError:
            given = kwargs  # the pipeline's own call raises the argument error
        for side in ("height", "width"):
            if given.get(side) is not None:
                validate_size(side, given[side], info.size_multiple, info.name)
        return base_call(*args, **kwargs)


class HiresModularPipelineMixin:
    """A Modular Diffusers pipeline class plus `hires_config`, kept as for the classic ones. hires attaches on the
    first call, so the graph may be edited and the components loaded (`load_components`) in between."""

    def __call__(self, state=None, output=None, hires_config: HiresConfig | None = None, **kwargs):
        info = _attach(self, hires_config)
        for side in ("height", "width"):
            if kwargs.get(side) is not None:
                validate_size(side, kwargs[side], info.size_multiple, info.name)
        return super().__call__(state, output, **kwargs)


def _pipeline_class(name: str) -> type:
    """The diffusers pipeline class `name`, or a loaded subclass of a diffusers pipeline class of that name (a
    family registered for a pipeline of its own)."""
    found = getattr(diffusers, name, None)
    pending = [diffusers.DiffusionPipeline, diffusers.ModularPipeline]
    while found is None and pending:
        cls = pending.pop()
        found = cls if cls.__name__ == name else None
        pending.extend(cls.__subclasses__())
    if found is None:
        raise ValueError(f"pipeline class {name!r} is neither in diffusers nor a loaded diffusers pipeline subclass")
    return found


def ready_class(base: type | str) -> type:
    """The ready class of the diffusers pipeline class `base` (a class, or its name in diffusers): `base` plus
    `hires_config`, named `Hires<base>` in this module (made on first use), so that pickling and diffusers'
    save_pretrained / from_pretrained find it by name as any class of its own module."""
    base = _pipeline_class(base) if isinstance(base, str) else base
    name = ready_class_name(base.__name__)
    made = globals().get(name)
    if made is not None:
        if base not in made.__bases__:
            raise ValueError(f"base={base.__qualname__}: {__name__}.{name} already exists for "
                             f"{made.__bases__[-1].__module__}.{made.__bases__[-1].__qualname__}")
        return made
    mixin = HiresModularPipelineMixin if issubclass(base, diffusers.ModularPipeline) else HiresPipelineMixin
    families = ready_classes().get(base.__name__, ())
    about = f" (family {', '.join(f.name for f in families)})" if families else ""
    made = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name,
                                      "__doc__": f"{base.__name__}{about} with hires."})
    globals()[name] = made
    return made


# One ready class per family record that names it (Family.ready_base_classes), in the records' order.
_READY = tuple(ready_class(base) for base in ready_classes(FAMILIES))
READY_PIPELINES = tuple(c for c in _READY if issubclass(c, HiresPipelineMixin))
READY_MODULAR_PIPELINES = tuple(c for c in _READY if issubclass(c, HiresModularPipelineMixin))


def __getattr__(name):
    # The ready class of a family added after this module was imported (a record registered from outside).
    base = next((b for b in ready_classes() if ready_class_name(b) == name), None)
    if base is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return ready_class(base)
