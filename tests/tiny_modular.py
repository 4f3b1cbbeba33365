"""Tiny Modular Diffusers pipelines for the tests: each family's auto blocks with the very modules of the
classic tiny pipeline (tests/tiny_models.py), and a tiny Flux 3 (a modular pipeline only) from configs in code.

A modular pipeline runs CFG through its guider component; `CFG` says which guider each family gets. Flux,
Flux.2 and the Flux 3 distilled model have no guider.
"""

from __future__ import annotations

import torch
from transformers import ProcessorMixin

import tiny_models as tm

# family -> the auto-blocks class whose graph the modular pipeline runs
AUTO_BLOCKS = {
    "sdxl": "StableDiffusionXLAutoBlocks",
    "sd3": "StableDiffusion3AutoBlocks",
    "flux": "FluxAutoBlocks",
    "flux2": "Flux2AutoBlocks",
    "flux2_klein": "Flux2KleinBaseAutoBlocks",
    "qwenimage": "QwenImageAutoBlocks",
    "zimage": "ZImageAutoBlocks",
    "flux3": "Flux3AutoBlocks",
    "flux3_distilled": "Flux3DistilledAutoBlocks",
}
FAMILIES = tuple(AUTO_BLOCKS)
# The guider of each family that has one: CFG at the scale the classic tiny call uses. Z-Image's classic pipeline
# combines cond + s (cond - uncond): the guider's original formulation.
GUIDERS = {
    "sdxl": dict(guidance_scale=5.0),
    "sd3": dict(guidance_scale=5.0),
    "flux2_klein": dict(guidance_scale=4.0),
    "qwenimage": dict(guidance_scale=4.0),
    "zimage": dict(guidance_scale=3.0, use_original_formulation=True),
    "flux3": dict(guidance_scale=3.5),
}
# What each family's call passes besides prompt, size, steps and generator.
CALL_KWARGS = {
    "sdxl": {},
    "sd3": {"negative_prompt": "", "max_sequence_length": tm.TEXT_LEN},  # modular SD3 runs CFG only with one
    "flux": {"guidance_scale": 3.5, "max_sequence_length": tm.TEXT_LEN},
    "flux2": {"guidance_scale": 4.0, "max_sequence_length": tm.TEXT_LEN},
    "flux2_klein": {"max_sequence_length": tm.TEXT_LEN},
    "qwenimage": {"negative_prompt": " ", "max_sequence_length": tm.TEXT_LEN},
    "zimage": {"max_sequence_length": tm.TEXT_LEN},
    "flux3": {"text_encoder_out_layers": (1, 2)},
    "flux3_distilled": {"text_encoder_out_layers": (1, 2)},
}
FLUX3_HIDDEN = 16
# The text encoder's hidden layers Flux 3 stacks when the call names none (its text encoder step's default): a
# saved tiny Flux 3 has that many layers, so the command line, which passes no such argument, can run it.
FLUX3_DEFAULT_OUT_LAYERS = (4, 8, 12, 16, 20, 24, 28, 32)


class ChatProcessor(ProcessorMixin):
    """What Flux 3's text encoder step needs of its `tokenizer` (a Qwen3-VL AutoProcessor in real checkpoints, whose
    image processor needs torchvision): a processor holding the tokenizer and the chat template, which
    `save_pretrained` writes and `from_pretrained` reads back (the saved folder names this module as its library)."""

    def __init__(self, tokenizer=None, chat_template=None):
        super().__init__(tokenizer, chat_template=chat_template)


def make_qwen3_vl(layers: int = 2):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = dict(vocab_size=len(tm.WORDS) + 4, hidden_size=FLUX3_HIDDEN, intermediate_size=32,
                num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=512, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=FLUX3_HIDDEN,
                  deepstack_visual_indexes=[0], num_position_embeddings=16)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=1, video_token_id=1,
                           vision_start_token_id=1, vision_end_token_id=1)
    return Qwen3VLForConditionalGeneration(config).eval()


def make_flux3_transformer(flow_map: bool = False, text_layers: int | None = None):
    from diffusers import Flux3Transformer2DModel

    text_layers = len(CALL_KWARGS["flux3"]["text_encoder_out_layers"]) if text_layers is None else text_layers
    # in_channels = 4 x the VAE's 4 latent channels (2x2 patches); the RoPE axes sum to the head dimension
    return Flux3Transformer2DModel(in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2,
                                   joint_attention_dim=text_layers * FLUX3_HIDDEN, timestep_channels=32,
                                   axes_dims_rope=(4, 4, 4, 4), flow_map=flow_map).eval()


def _flux3_components(distilled: bool, default_layers: bool = False) -> dict:
    torch.manual_seed(0)
    tokenizer = tm.make_tokenizer(tm.TEXT_LEN)
    taps = len(FLUX3_DEFAULT_OUT_LAYERS) if default_layers else None
    encoder = make_qwen3_vl(max(FLUX3_DEFAULT_OUT_LAYERS)) if default_layers else make_qwen3_vl()
    # the chat template's role markers, so the empty negative prompt still has tokens
    return dict(transformer=make_flux3_transformer(distilled, taps), vae=tm.make_flux2_vae(), text_encoder=encoder,
                tokenizer=ChatProcessor(tokenizer, chat_template=tm.CHAT_TEMPLATE))


def blocks(family: str):
    """A fresh instance of the family's auto blocks (Flux 3 without its prompt upsampler, a large model)."""
    import diffusers

    graph = getattr(diffusers, AUTO_BLOCKS[family])()
    if family.startswith("flux3"):
        graph.sub_blocks.pop("prompt_upsampler")
    return graph


def components(family: str, classic=None) -> dict:
    """The modules a modular pipeline of `family` is given: those of the classic tiny pipeline (`classic`, built
    if not given), or Flux 3's own."""
    if family.startswith("flux3"):
        return _flux3_components(family == "flux3_distilled")
    classic = classic if classic is not None else tm.build(family)
    return {k: v for k, v in classic.components.items() if v is not None}


def init(graph, family: str, parts: dict, cls=None):
    """`graph.init_pipeline()` (or the pipeline class `cls` on `graph`) given `parts` (the names its blocks expect)
    and the family's guider."""
    from diffusers import ClassifierFreeGuidance

    pipe = graph.init_pipeline() if cls is None else cls(blocks=graph)
    pipe.update_components(**{k: v for k, v in parts.items() if k in pipe.component_names})
    if family in GUIDERS:
        pipe.update_components(guider=ClassifierFreeGuidance(**GUIDERS[family]))
    for loop in _loops(pipe._blocks):
        loop.set_progress_bar_config(disable=True)  # nested loops: the pipeline's own setter misses them
    return pipe


def _loops(block):
    from diffusers import LoopSequentialPipelineBlocks

    for sub in block.sub_blocks.values():
        if isinstance(sub, LoopSequentialPipelineBlocks):
            yield sub
        else:
            yield from _loops(sub)


def shared_parts(pipe) -> dict:
    """The modules and tokenizers of `pipe`, for a second pipeline on the very same objects."""
    from diffusers import SchedulerMixin

    return {k: v for k, v in pipe.components.items()
            if isinstance(v, (torch.nn.Module, SchedulerMixin)) or "tokenizer" in k}


def build(family: str, classic=None):
    """The tiny modular pipeline of `family`."""
    return init(blocks(family), family, components(family, classic))


def build_for_folder(family: str):
    """The tiny modular pipeline of `family` that a saved folder holds for callers that pass only prompt, size,
    steps and seed (the command line): Flux 3 with a text encoder deep enough for its default layer taps."""
    if family.startswith("flux3"):
        return init(blocks(family), family, _flux3_components(family == "flux3_distilled", default_layers=True))
    return build(family)


def generate(pipe, family: str, size: int = 64, steps: int = 2, seed: int = 0, **overrides) -> torch.Tensor:
    """The images of one call, as a (B, 3, H, W) tensor."""
    import numpy as np

    kwargs = dict(CALL_KWARGS[family], output_type="pt")
    kwargs.update(overrides)
    images = pipe(prompt="a red circle", height=size, width=size, num_inference_steps=steps,
                  generator=torch.Generator("cpu").manual_seed(seed), output="images", **kwargs)
    if isinstance(images, torch.Tensor):
        return images
    if isinstance(images, list) and images and isinstance(images[0], torch.Tensor):
        return torch.stack(images)
    return torch.as_tensor(np.stack([np.asarray(image) for image in images]))
