"""The call boundary, the guidance facts and the stages block of a Modular Diffusers pipeline (see the package)."""

from __future__ import annotations

import dataclasses
import json
import sys
import zlib
from pathlib import Path

import torch
from diffusers import ClassifierFreeGuidance, LoopSequentialPipelineBlocks, ModularPipeline, ModularPipelineBlocks
from diffusers.modular_pipelines import PipelineState

from ..config import HiresConfig
from ..families import ModelInfo, read_model_info
from ..sampling.stages import ENGINE_ATTRIBUTE, StageRequest, plan_stages
from ..validation import validate_size

# The top-level entry of every supported family's graph that prepares the latents and runs the denoise loop.
DENOISE_ENTRY = "denoise"
# Where a modular pipeline finds its attachment during a call (a ledger entry: hires.remove takes it out), and
# whether a hand-inserted HiresStagesStep already attached hires to it once (it never attaches again after a remove).
ATTACHMENT_ATTRIBUTE = "_hires_modular_attachment"
ATTACHED_BY_BLOCK = "_hires_attached_by_block"
# The classic pipelines' names for these call values, so CallState reads a modular call the same way.
CFG_SWITCH = "do_true_cfg"
GUIDANCE_SCALE = "guidance_scale"
# State values that make a modular call image-to-image (the vae_encoder block sets them when `image` is passed).
IMAGE_LATENTS = "image_latents"
BLOCK_FILE = "modular_config.json"


def is_modular(pipe) -> bool:
    """Whether `pipe` is a Modular Diffusers pipeline."""
    return isinstance(pipe, ModularPipeline)


def drop_unloaded_steps(pipe) -> list[str]:
    """Take out of `pipe`'s graph each top-level step whose every model (its `from_pretrained` components) the
    pipeline has not loaded, and return their names. A saved pipeline comes back with its graph class's full
    graph: Flux 3's begins with a prompt upsampler, a model of its own that its folder need not hold; without it
    the prompt is encoded as given (diffusers' own advice: pop that step)."""
    dropped = []
    for name, block in list(pipe._blocks.sub_blocks.items()):
        models = [spec.name for spec in block.expected_components if spec.default_creation_method == "from_pretrained"]
        if models and all(getattr(pipe, model, None) is None for model in models):
            pipe._blocks.sub_blocks.pop(name)
            dropped.append(name)
    return dropped


def _plain_cfg(guider) -> bool:
    """A guider whose combination hires' guidance hook can stand in for: classic CFG without rescaling, on every
    step (a step window would run the cond pass alone on some steps, and the hook pairs cond and uncond passes)."""
    return (type(guider) is ClassifierFreeGuidance and not getattr(guider, "guidance_rescale", 0.0)
            and getattr(guider, "_start", 0.0) == 0.0 and getattr(guider, "_stop", 1.0) == 1.0)


def modular_info(pipe, base_size=None) -> ModelInfo:
    """`read_model_info` of a modular pipeline, with the CFG facts of its guider: separate passes, cond first,
    combined as uncond + s (cond - uncond) (or cond + s (cond - uncond): w = s + 1 with the original
    formulation); no CFG where the pipeline has no guider (Flux, Flux.2, the distilled models)."""
    info = read_model_info(pipe, base_size)
    family = info.family
    if family.modular_attention_masked is not None:
        family = dataclasses.replace(family, attention_masked=family.modular_attention_masked)
    guider = getattr(pipe, "guider", None)
    if family.runs_cfg and guider is not None and _plain_cfg(guider):
        family = dataclasses.replace(family, guidance_layout="separate", guidance_scale_name=GUIDANCE_SCALE,
                                     cfg_switch=CFG_SWITCH, cfg_cond_first=True,
                                     guidance_scale_offset=1.0 if guider.use_original_formulation else 0.0)
    else:
        family = dataclasses.replace(family, guidance_layout="none", apg=None)
    return dataclasses.replace(info, family=family)


def check_guider(pipe, config: HiresConfig) -> None:
    """A guidance technique acts through hires' hook on a plain ClassifierFreeGuidance guider; refuse any other."""
    guider = getattr(pipe, "guider", None)
    uses_apg = config.apg.enabled or any(entry.enabled for entry in config.stage_settings().get("apg", ()))
    if uses_apg and guider is None:
        raise ValueError(f"APGConfig changes how classifier-free guidance combines, but this {type(pipe).__name__} "
                         "has no guider component: it runs no CFG; disable APGConfig for this pipeline")
    if uses_apg and not _plain_cfg(guider):
        raise ValueError(
            f"APGConfig on a {type(pipe).__name__} needs its guider to be a plain ClassifierFreeGuidance "
            f"(guidance_rescale=0, start=0, stop=1), got {type(guider).__name__}{_guider_options(guider)}: hires "
            "applies APG itself, on x0 and with a size-independent norm threshold; set "
            "pipe.update_components(guider=ClassifierFreeGuidance(...)) or disable APGConfig")


def _guider_options(guider) -> str:
    if type(guider) is not ClassifierFreeGuidance:
        return ""
    return (f"(guidance_rescale={guider.guidance_rescale}, start={getattr(guider, '_start', 0.0)}, "
            f"stop={getattr(guider, '_stop', 1.0)})")


def graph_blocks(block):
    """Every block of a graph, depth first, the block a HiresStagesStep wraps included."""
    yield block
    inner = [block.inner] if isinstance(block, HiresStagesStep) else []
    for sub in inner + list(block.sub_blocks.values()):
        yield from graph_blocks(sub)


def loop_blocks(block) -> list[LoopSequentialPipelineBlocks]:
    """The denoise loops of a graph (SDXL's auto blocks have four: text-to-image, inpaint, and both with
    ControlNet)."""
    return [b for b in graph_blocks(block) if isinstance(b, LoopSequentialPipelineBlocks)]


def attach(attachment, make_scope) -> None:
    """Give `attachment` its call boundary on a modular pipeline: the stages block on the graph's denoise entry
    (unless the graph carries one), and a shadow of every loop's progress_bar that opens the call scope
    `make_scope(bar, call values, loop view)`. All of it is a ledger entry or an undo of the attachment."""
    pipe = attachment.pipe
    graph = pipe._blocks
    attachment.shadow(pipe, ATTACHMENT_ATTRIBUTE, attachment)
    if not any(isinstance(b, HiresStagesStep) for b in graph_blocks(graph)):
        entry = graph.sub_blocks.get(DENOISE_ENTRY)
        if entry is None:
            raise TypeError(f"hires cannot attach to this {type(pipe).__name__}: its block graph has no "
                            f"{DENOISE_ENTRY!r} entry (top-level entries: {', '.join(graph.sub_blocks)})")
        wrapper = HiresStagesStep(entry, attaches=False)
        graph.sub_blocks[DENOISE_ENTRY] = wrapper

        def undo():
            if graph.sub_blocks.get(DENOISE_ENTRY) is wrapper:
                graph.sub_blocks[DENOISE_ENTRY] = entry

        attachment.on_detach(undo)
    for loop in loop_blocks(graph):
        attachment.wrap_method(loop, "progress_bar", lambda original: _progress_bar(attachment, original, make_scope))


def _call_values(attachment, state) -> dict:
    """The classic __call__ locals techniques read (runtime._CALL_LOCALS), from the loop's state and the guider."""
    values = {"generator": state.get("generator"), "num_inference_steps": state.get("num_inference_steps")}
    guider = getattr(attachment.pipe, "guider", None)
    if attachment.info.family.cfg_separate and guider is not None:
        values[GUIDANCE_SCALE] = guider.guidance_scale
        values[CFG_SWITCH] = bool(guider._enabled)
    elif state.get(GUIDANCE_SCALE) is not None:  # Flux's and Flux.2's guidance embedding
        values[GUIDANCE_SCALE] = state.get(GUIDANCE_SCALE)
    return values


class _LoopView:
    """What the finite-output guard reads of a running loop (as of a classic __call__ frame): its latents."""

    def __init__(self, block_state):
        self.block_state = block_state

    @property
    def f_locals(self) -> dict:
        return {"latents": getattr(self.block_state, "latents", None)}


def _progress_bar(attachment, original, make_scope):
    def progress_bar(iterable=None, total=None):
        bar = original(iterable=iterable, total=total)
        frame = sys._getframe(1)  # the loop block's __call__
        if iterable is not None or frame.f_locals.get("components") is not attachment.pipe:
            return bar
        state, block_state = frame.f_locals["state"], frame.f_locals["block_state"]
        scope = make_scope(bar, _call_values(attachment, state), _LoopView(block_state))
        return _LoopScope(attachment.pipe.__dict__.get(ENGINE_ATTRIBUTE), scope, block_state)

    return progress_bar


class _LoopScope:
    """Around the call scope of one loop: a running stage starts from its planned latent and keeps the result."""

    def __init__(self, engine, scope, block_state):
        self.engine, self.scope, self.block_state = engine, scope, block_state
        self.stage = engine.current if engine is not None and engine.running else None

    def __enter__(self):
        stage = self.stage
        if stage is not None and stage.x0 is not None:
            self.block_state.latents = self.engine.start_latents(stage, self.block_state.latents)
        return self.scope.__enter__()

    def __exit__(self, exc_type, exc, tb):
        result = self.scope.__exit__(exc_type, exc, tb)
        stage = self.stage
        if exc_type is None and stage is not None and not stage.stops_early:
            stage.result = self.engine.stage_result(stage, self.block_state.latents)
        return result


class HiresStagesStep(ModularPipelineBlocks):
    """Runs the block it wraps (a graph's `denoise` entry) once per stage of hires' stage plan.

    By hand: `blocks.sub_blocks["denoise"] = HiresStagesStep(blocks.sub_blocks["denoise"], config)` before
    `init_pipeline()` (or on `pipe._blocks`, the live graph: `pipe.blocks` is a copy). On its first call it
    applies hires with `config` (None: the automatic preset) to the pipeline running it, unless hires is applied
    already; `hires.remove(pipe)` takes the hooks out and the block then runs the wrapped block as it is. A call
    at the base size (one trivial stage) runs the wrapped block on the call's own state, so it is exactly the
    graph without this block.

    The wrapped block is not one of `sub_blocks`: a workflow selection (`get_workflow`) would flatten it away.
    """

    model_name = None

    def __init__(self, inner, config: HiresConfig | None = None, attaches: bool = True):
        if not isinstance(inner, ModularPipelineBlocks):
            raise TypeError(f"HiresStagesStep(inner={inner!r}): inner must be the graph's denoise block (a "
                            "ModularPipelineBlocks such as blocks.sub_blocks['denoise'])")
        if config is not None and not isinstance(config, HiresConfig):
            raise TypeError(f"HiresStagesStep(config={config!r}): config must be a hires.HiresConfig or None "
                            "(the automatic preset)")
        super().__init__()
        self.inner, self.hires_config, self.attaches = inner, config, attaches

    @property
    def description(self) -> str:
        return f"hires: runs {type(self.inner).__name__} once per stage of hires' stage plan"

    @property
    def expected_components(self):
        return self.inner.expected_components

    @property
    def expected_configs(self):
        return self.inner.expected_configs

    @property
    def inputs(self):
        return self.inner.inputs

    @property
    def intermediate_outputs(self):
        return self.inner.intermediate_outputs

    @torch.no_grad()
    def __call__(self, components, state: PipelineState):
        if self.attaches and not components.__dict__.get(ATTACHED_BY_BLOCK):
            import hires

            if not hires.is_applied(components):
                hires.apply(components, self.hires_config)  # a refused config raises on every call
            components.__dict__[ATTACHED_BY_BLOCK] = True
        attachment = components.__dict__.get(ATTACHMENT_ATTRIBUTE)
        if attachment is None:
            return self.inner(components, state)
        height, width = state.get("height"), state.get("width")
        for side, value in (("height", height), ("width", width)):
            if value is not None:
                validate_size(side, value, attachment.info.size_multiple, attachment.info.name)
        if height is not None and width is not None and height * width > attachment.info.base_height * \
                attachment.info.base_width:
            attachment.check_memory_floor(height, width)
        engine = components.__dict__.get(ENGINE_ATTRIBUTE)
        if engine is None or height is None or width is None:  # no size given: the family's default, its base
            return self.inner(components, state)
        return _run_stages(engine, self.inner, components, state)


def _stage_state(state: PipelineState) -> PipelineState:
    mapping = {kind: list(names) for kind, names in state.kwargs_mapping.items()}
    return PipelineState(values=dict(state.values), kwargs_mapping=mapping)


def _run_stages(engine, inner, components, state: PipelineState):
    arguments = dict(state.values)
    request = StageRequest(int(state.get("height")), int(state.get("width")), state.get("num_inference_steps"),
                           arguments, tuple(arguments), state.get("generator"))
    stages = plan_stages(engine.planners, request)
    if len(stages) == 1 and stages[0].trivial:
        return inner(components, state)
    owners = " and ".join(sorted({s.owner if s.parent is None else s.parent.owner for s in stages}))
    if state.get("latents") is not None:
        raise ValueError(f"latents= cannot be combined with {owners}: its stages prepare their own latents at "
                         "other sizes; pass generator= for reproducible results")
    if state.get(IMAGE_LATENTS) is not None:
        raise ValueError(f"image= (image-to-image) cannot be combined with {owners} in a modular pipeline: each "
                         "stage would re-run the image branch at its own size; call it without image=")
    attachment = engine.attachment
    guider = getattr(components, "guider", None)
    engine.running = True
    engine.shadow_scheduler(any(s.stops_early or s.after_step for s in stages))
    stage_state, previous = state, None
    try:
        for stage in stages:
            if stage.start is not None:
                stage.x0 = stage.start(stage, previous)
            stage_state = _stage_state(state)
            stage_state.set("height", stage.height)
            stage_state.set("width", stage.width)
            stage_state.set("latents", None)
            shadows = []
            for name, value in stage.call_arguments.items():
                if name in arguments:
                    stage_state.set(name, value)
                elif name == attachment.info.family.guidance_scale_name and guider is not None and value is not None:
                    shadows.append(attachment.shadow(guider, GUIDANCE_SCALE, value))  # the guider holds the scale
            engine.current = stage
            try:
                _, stage_state = inner(components, stage_state)
            finally:
                engine.current = None
                for entry in reversed(shadows):
                    attachment.unshadow(entry)
            if stage.result is None:
                raise RuntimeError(f"{stage.owner} stage {stage.height}x{stage.width} ran no step of its schedule")
            if stage.parent is not None:
                stage.parent.timesteps += stage.timesteps
            if previous is not None:
                previous.drop_tensors()
            stage.x0 = stage.noise = None
            previous = stage
    finally:
        engine.running = False
        engine.current = None
        engine.unshadow_scheduler()
    for stage in stages:
        stage.drop_tensors()
    engine.last_run = tuple(stages)
    # The last stage ran at the requested size: its outputs are the call's (the decode block reads them).
    for name, value in stage_state.values.items():
        state.values[name] = value
    for kind, names in stage_state.kwargs_mapping.items():
        state.kwargs_mapping.setdefault(kind, [])
        state.kwargs_mapping[kind].extend(n for n in names if n not in state.kwargs_mapping[kind])
    return components, state


# -- a folder that ModularPipelineBlocks.from_pretrained(folder, trust_remote_code=True) loads ------------------
_FOLDER_MODULE = '''"""hires' stage techniques as a Modular Diffusers block (hires.modular.save_block_folder wrote it).

Load it with ModularPipelineBlocks.from_pretrained(folder, trust_remote_code=True,
inner=blocks.sub_blocks["denoise"]) and put it in the denoise entry's place: blocks.sub_blocks["denoise"] = block.
"""

import json

from hires import HiresConfig
from hires.modular import HiresStagesStep

CONFIG = json.loads({config!r})  # null: the automatic preset of the pipeline's family


class {name}(HiresStagesStep):
    def __init__(self, inner):
        super().__init__(inner, None if CONFIG is None else HiresConfig.from_dict(CONFIG))
'''


def save_block_folder(folder, config: HiresConfig | None = None) -> Path:
    """Write a custom-block folder holding `HiresStagesStep` with `config` (None: the automatic preset): the
    `modular_config.json` diffusers reads, and the module it names. Module and class are named after the
    config, since diffusers copies every local folder's module into one shared namespace."""
    if config is not None and not isinstance(config, HiresConfig):
        raise TypeError(f"save_block_folder(config={config!r}): config must be a hires.HiresConfig or None")
    import diffusers

    text = json.dumps(None if config is None else config.to_dict(), sort_keys=True)
    tag = f"{zlib.crc32(text.encode()):08x}"
    module, name = f"hires_stages_{tag}", f"HiresStages{tag}"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(_FOLDER_MODULE.format(config=text, name=name), encoding="utf-8")
    manifest = {"_class_name": name, "_diffusers_version": diffusers.__version__,
                "auto_map": {"ModularPipelineBlocks": f"{module}.{name}"}}
    (folder / BLOCK_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return folder
