"""Tiny pipelines of every supported family, built from configs in code with random weights.

Each one has the real classes of its family (UNet / DiT, VAE with latent factor 8, CLIP and T5 text
encoders, a word-level tokenizer built in code) at a size that generates 64-128 px in well under a
second on a CPU. Base sizes are 64 px (latent 8x8) so 2x and 4x runs stay cheap.
"""

from __future__ import annotations

import torch
from hires.families import FAMILIES
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    ProcessorMixin,  # noqa: F401  (diffusers reloads this module's Qwen3-VL processor by that base)
    Qwen3VLProcessor,
    T5Config,
    T5EncoderModel,
)

WORDS = ("a an the red green blue yellow circle square triangle photo of on white black background big small cat "
         "dog").split()
BASE_LATENT = 8  # latent side at the base size; x8 VAE factor -> 64 px
TEXT_LEN = 16


def make_tokenizer(max_length: int = TEXT_LEN) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=max_length,
    )


def _clip_config(hidden: int, projection: int = 0, positions: int = TEXT_LEN) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=positions,
        projection_dim=projection or hidden,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )


def make_clip(hidden: int = 32, with_projection: bool = False, projection: int = 0, positions: int = TEXT_LEN):
    config = _clip_config(hidden, projection, positions)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def make_t5(d_model: int = 32) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(WORDS) + 4,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=3,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def make_vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=BASE_LATENT * 8,
        **extra,
    ).eval()


def _unet(linear_projection: bool, cross_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=BASE_LATENT,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=(2, 4) if linear_projection else 8,
        use_linear_projection=linear_projection,
        norm_num_groups=8,
        **extra,
    ).eval()


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def sd_pipeline(linear_projection: bool = False, prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    _seed(0)
    return StableDiffusionPipeline(
        vae=make_vae(),
        text_encoder=make_clip(32),
        tokenizer=make_tokenizer(),
        unet=_unet(linear_projection, 32),
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type=prediction_type,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    _seed(0)
    time_dim = 8
    unet = _unet(
        True,
        64,  # text_encoder (32) + text_encoder_2 (32) hidden states concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 32,
        transformer_layers_per_block=(1, 2),
    )
    return StableDiffusionXLPipeline(
        vae=make_vae(),
        text_encoder=make_clip(32),
        text_encoder_2=make_clip(32, with_projection=True),
        tokenizer=make_tokenizer(),
        tokenizer_2=make_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085,
            beta_end=0.012, steps_offset=1, timestep_spacing="leading"
        ),
        force_zeros_for_empty_prompt=True,
    )


def pixart_pipeline():
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    _seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=BASE_LATENT,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=32,
        in_channels=4,
        out_channels=8,  # learned sigma
        cross_attention_dim=16,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()
    return PixArtSigmaPipeline(
        tokenizer=make_tokenizer(),
        text_encoder=make_t5(32),
        vae=make_vae(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    )


def sd3_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    _seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=BASE_LATENT,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 width; the two CLIPs (16 + 16) are padded to it
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=4,
        # Like SD3's 192 for a 128 base: 1.5x the base grid, so 4x-side requests exceed the table.
        pos_embed_max_size=BASE_LATENT * 3 // 2,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=make_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=make_clip(16, with_projection=True),
        tokenizer=make_tokenizer(),
        text_encoder_2=make_clip(16, with_projection=True),
        tokenizer_2=make_tokenizer(),
        text_encoder_3=make_t5(32),
        tokenizer_3=make_tokenizer(),
    )


def flux_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    _seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5, max_shift=1.15
        ),
        vae=make_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=make_clip(32),
        tokenizer=make_tokenizer(),
        text_encoder_2=make_t5(32),
        tokenizer_2=make_tokenizer(),
        transformer=transformer,
    )
    # FluxPipeline hard-codes 128 (1024 px); this tiny model's base is 64 px.
    pipe.default_sample_size = BASE_LATENT
    return pipe


# Chat templates of the tiny chat tokenizers: only the user's text is rendered (Flux.2's long system
# message would fill the tiny text length with unknown words and hide the prompt).
_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endif %}{% endfor %}"
)
# Flux.2 stacks the text encoder's hidden states of layers (10, 20, 30) [dev] / (9, 18, 27) [klein] by
# default, so the tiny decoders keep that many (narrow) layers.
_FLUX2_LAYERS = 31
_KLEIN_LAYERS = 28
_CHAT_HIDDEN = 16


def make_chat_tokenizer(max_length: int = TEXT_LEN) -> PreTrainedTokenizerFast:
    tokenizer = make_tokenizer(max_length)
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def make_mistral3():
    """A tiny Mistral3ForConditionalGeneration (Flux.2 [dev]'s text encoder: Mistral-Small-3.1 with Pixtral)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16, "head_dim": 8},
        text_config={"model_type": "mistral", "vocab_size": len(WORDS) + 4, "hidden_size": _CHAT_HIDDEN,
                     "intermediate_size": 32, "num_hidden_layers": _FLUX2_LAYERS, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 1024, "pad_token_id": 0},
        image_token_index=1,
    )
    return Mistral3ForConditionalGeneration(config).eval()


def make_klein_qwen3():
    """A tiny Qwen3ForCausalLM (Flux.2 [klein]'s text encoder)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=len(WORDS) + 4, hidden_size=_CHAT_HIDDEN, intermediate_size=32,
                         num_hidden_layers=_KLEIN_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=1024, pad_token_id=0)
    return Qwen3ForCausalLM(config).eval()


def make_flux2_vae():
    """AutoencoderKLFlux2 (x8, 4 latent channels here; Flux.2's has 32) with non-trivial latent statistics."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=BASE_LATENT * 8,
    ).eval()
    # The pipeline normalises patchified latents by the batch norm's running statistics.
    generator = torch.Generator().manual_seed(1)
    vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.running_mean.shape, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=generator))
    return vae


def _flux2_transformer(guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels patchified 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * _CHAT_HIDDEN,  # three stacked hidden-state layers
        timestep_guidance_channels=16,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    ).eval()


def _flux2_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Flux.2's scheduler config: dynamic shifting with the mu its pipeline computes.
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0, base_image_seq_len=256,
                                           max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)


def flux2_pipeline():
    from diffusers import Flux2Pipeline

    _seed(0)
    pipe = Flux2Pipeline(scheduler=_flux2_scheduler(), vae=make_flux2_vae(), text_encoder=make_mistral3(),
                         tokenizer=make_chat_tokenizer(), transformer=_flux2_transformer(guidance_embeds=True))
    pipe.default_sample_size = BASE_LATENT  # Flux2Pipeline hard-codes 128 (1024 px)
    return pipe


def flux2_klein_pipeline():
    from diffusers import Flux2KleinPipeline

    _seed(0)
    pipe = Flux2KleinPipeline(scheduler=_flux2_scheduler(), vae=make_flux2_vae(), text_encoder=make_klein_qwen3(),
                              tokenizer=make_chat_tokenizer(), transformer=_flux2_transformer(guidance_embeds=False))
    pipe.default_sample_size = BASE_LATENT
    return pipe


def chroma_pipeline():
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    _seed(0)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=8,
        approximator_hidden_dim=16,
        approximator_layers=1,
    ).eval()
    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5, max_shift=1.15
        ),
        vae=make_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=make_t5(32),
        tokenizer=make_tokenizer(),
        transformer=transformer,
    )
    pipe.default_sample_size = BASE_LATENT  # ChromaPipeline hard-codes 128 (1024 px)
    return pipe


def make_qwen25_vl(hidden: int = 32):
    """Qwen2.5-VL (Qwen-Image's text encoder) from a small config: the real class, a one-block vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
    text = dict(vocab_size=len(WORDS) + 4, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}, **ids)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                  fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=1, video_token_id=1, **ids)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def make_qwenimage_vae():
    """Qwen-Image's causal 3D VAE (x8 spatial, per-channel latents mean / std) at a tiny width."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                  temperal_downsample=[False, True, True],
                                  latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 1.2, 0.8]).eval()


def qwenimage_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    _seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 4 latent channels packed 2x2
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    pipe = QwenImagePipeline(
        # Qwen-Image's scheduler shifts dynamically (exponential), its token range scaled to the tiny base.
        scheduler=FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5, max_shift=0.9,
            shift=1.0, time_shift_type="exponential",
        ),
        vae=make_qwenimage_vae(),
        text_encoder=make_qwen25_vl(32),
        # The pipeline drops the first 34 tokens of its prompt template (Qwen's tokenizer makes 34 of
        # the template's system part); this word-level one makes 36, so two template tokens stay: the
        # embeddings still follow the prompt, and every copy of the pipeline (from_pipe, loaded) agrees.
        tokenizer=make_tokenizer(1100),  # the pipeline truncates at 1024 + 34 tokens
        transformer=transformer,
    )
    pipe.default_sample_size = BASE_LATENT  # QwenImagePipeline hard-codes 128 (1024 px)
    return pipe


def make_qwen3(hidden: int = 32):
    """Qwen3 (Z-Image's text encoder) from a small config: the real class."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=len(WORDS) + 4, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=512, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return Qwen3Model(config).eval()


# ZImagePipeline formats each prompt with the tokenizer's chat template (Qwen3's wraps it in
# <|im_start|> ... <|im_end|> turns); the word-level tokenizer gets a template of the same shape.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def zimage_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    _seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,
        axes_dims=[4, 6, 6],  # head dim 16
        axes_lens=[128, 32, 32],  # 32 tokens a side: 512 px, as Z-Image's 512 stop at 8192 px
    ).eval()
    tokenizer = make_tokenizer(TEXT_LEN)
    tokenizer.chat_template = CHAT_TEMPLATE
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # Z-Image Turbo's static shift
        vae=make_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=make_qwen3(32),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    # ZImagePipeline has no default_sample_size (hires reads 1024 px); this tiny model's base is 64 px.
    pipe.default_sample_size = BASE_LATENT
    return pipe


def make_mistral3_model(hidden: int = 16, layers: int = 3):
    """Mistral3Model (ERNIE-Image's text encoder; the pipeline reads hidden_states[-2]) from a small config."""
    from transformers import Mistral3Config, Mistral3Model

    config = Mistral3Config(
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16, "head_dim": 8},
        text_config={"model_type": "mistral", "vocab_size": len(WORDS) + 4, "hidden_size": hidden,
                     "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 1024, "pad_token_id": 0},
        image_token_index=1,
    )
    return Mistral3Model(config).eval()


def ernie_image_pipeline():
    from diffusers import ErnieImagePipeline, ErnieImageTransformer2DModel, FlowMatchEulerDiscreteScheduler

    _seed(0)
    transformer = ErnieImageTransformer2DModel(
        hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64,
        in_channels=16, out_channels=16,  # the 4 Flux.2 VAE channels, patchified 2x2 by the pipeline
        patch_size=1, text_in_dim=16, rope_theta=256, rope_axes_dim=(4, 6, 6),
    ).eval()
    # ERNIE-Image zero-initialises its modulation and output layers: random small ones make the output depend
    # on the input.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(2)
        for module in (transformer.adaLN_modulation[-1], transformer.final_linear):
            module.weight.copy_(0.2 * torch.randn(module.weight.shape, generator=generator))
    pipe = ErnieImagePipeline(
        transformer=transformer,
        vae=make_flux2_vae(),
        text_encoder=make_mistral3_model(16),
        tokenizer=make_tokenizer(TEXT_LEN),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=4.0),  # ERNIE-Image's static shift
    )
    # ErnieImagePipeline has no default_sample_size (its __call__ defaults to 1024 px); the x16 latent of this
    # tiny model is 4x4 at its 64 px base.
    pipe.default_sample_size = BASE_LATENT // 2
    return pipe


def make_qwen3_vl_model(hidden: int = 16, layers: int = 3, conditional: bool = False, vocab: int | None = None,
                        **token_ids):
    """Qwen3-VL from a small config: Qwen3VLModel (Krea-2's text encoder: the pipeline taps several of its hidden
    states) or Qwen3VLForConditionalGeneration (Qwen-Image 2.1's, with the vision token ids of its tokenizer)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLModel

    text = dict(vocab_size=vocab or len(WORDS) + 4, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=1024, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                 "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **token_ids)
    return (Qwen3VLForConditionalGeneration if conditional else Qwen3VLModel)(config).eval()


KREA2_TEXT_LAYERS = (1, 2, 3)  # the hidden states Krea2Pipeline taps (0 is the embedding output)


def krea2_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel

    _seed(0)
    transformer = Krea2Transformer2DModel(
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=2, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
        timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=len(KREA2_TEXT_LAYERS),
        text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6),
    ).eval()
    pipe = Krea2Pipeline(
        # Krea-2's shift parameters (its docstring: dynamic, up to 6400 tokens), scaled to the tiny base's 16.
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4,
                                                  max_image_seq_len=100, base_shift=0.5, max_shift=1.15),
        vae=make_qwenimage_vae(),  # Qwen-Image's VAE, as Krea-2's
        text_encoder=make_qwen3_vl_model(16),
        tokenizer=make_tokenizer(1100),  # the pipeline pads to max_sequence_length + 29 tokens, drops the first 34
        transformer=transformer,
        text_encoder_select_layers=KREA2_TEXT_LAYERS,
    )
    pipe.default_sample_size = BASE_LATENT  # Krea2Pipeline has none (its __call__ defaults to 1024 px)
    return pipe


def make_llama(hidden: int = 16, layers: int = 2):
    """LlamaForCausalLM (HiDream-I1's fourth text encoder: Llama-3.1) from a small config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(WORDS) + 4, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=256, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


HIDREAM_LLAMA_LAYERS = 2  # the pipeline stacks hidden_states[1:]: one Llama layer per double and single block


def hidream_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel

    _seed(0)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2,
        caption_channels=[32, 16],  # [T5 width, Llama width]
        text_emb_dim=32,  # the two CLIP projections (16 + 16) concatenated
        num_routed_experts=2, num_activated_experts=1,
        axes_dims_rope=(4, 6, 6),  # (zero, row, column) axes; sums to the head dim
        max_resolution=(BASE_LATENT, BASE_LATENT),  # max_seq: the base area's 16 tokens, as HiDream's 4096
        llama_layers=list(range(HIDREAM_LLAMA_LAYERS)),
    ).eval()
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # HiDream-I1 Full's static shift
        vae=make_vae(shift_factor=0.1159, scaling_factor=0.3611),
        # HiDreamImagePipeline pads CLIP prompts to min(max_sequence_length, 218) tokens (its default: 128)
        text_encoder=make_clip(16, with_projection=True, positions=128), tokenizer=make_tokenizer(),
        text_encoder_2=make_clip(16, with_projection=True, positions=128), tokenizer_2=make_tokenizer(),
        text_encoder_3=make_t5(32), tokenizer_3=make_tokenizer(),
        text_encoder_4=make_llama(16, HIDREAM_LLAMA_LAYERS), tokenizer_4=make_tokenizer(),
        transformer=transformer,
    )
    pipe.default_sample_size = BASE_LATENT  # HiDreamImagePipeline hard-codes 128 (1024 px)
    return pipe


QWEN_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                       "<|vision_end|>"]
# A chat template that renders a system message given as a list of parts, as QwenImage21Pipeline's __init__ asks.
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
)


def make_qwen_vl_tokenizer(max_length: int = 4096) -> PreTrainedTokenizerFast:
    """Word-level tokenizer that knows Qwen's chat and vision special tokens (one token each)."""
    specials = ["<pad>", "<unk>", "<s>", "</s>"] + QWEN_SPECIAL_TOKENS
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>", model_max_length=max_length,
                                        additional_special_tokens=QWEN_SPECIAL_TOKENS)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


class TextImageQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor of an image processor and a tokenizer only: without torchvision, transformers exports no
    video processor base class, so a Qwen3VLProcessor cannot be built (ProcessorMixin reads the sub-processors from
    this signature). diffusers reloads it from this module, which imports ProcessorMixin (its loading rule)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def make_qwen3_vl_processor() -> TextImageQwen3VLProcessor:
    """The PIL image processor (the default one needs torchvision) and the word-level tokenizer."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return TextImageQwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil(patch_size=16, merge_size=2),
                                     tokenizer=make_qwen_vl_tokenizer(), chat_template=QWEN_CHAT_TEMPLATE)


def qwenimage21_pipeline():
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline
    from diffusers import QwenImage21Transformer2DModel

    _seed(0)
    processor = make_qwen3_vl_processor()
    tokenizer = processor.tokenizer
    vision_ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text_encoder = make_qwen3_vl_model(16, layers=2, conditional=True, vocab=len(tokenizer), **vision_ids)
    transformer = QwenImage21Transformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        context_in_dim=16, mlp_ratio=2, axes_dims_rope=(4, 6, 6),
    ).eval()
    vae = AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 1, 2, 2, 2],
                                   num_res_blocks=1, temperal_downsample=[False, True, True, True],
                                   latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 1.2, 0.8]).eval()
    pipe = QwenImage21Pipeline(
        # Qwen-Image 2.1's dynamic shift (256 to 4096 tokens: max at its 1024 px base), scaled to the tiny base's 16.
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=1,
                                                  max_image_seq_len=16, base_shift=0.5, max_shift=1.15),
        vae=vae, text_encoder=text_encoder, processor=processor, transformer=transformer,
    )
    # QwenImage21Pipeline has none (its base is output_resolution, 1024 px); the x16 latent of this tiny model's
    # 64 px base is 4 tokens a side.
    pipe.default_sample_size = BASE_LATENT // 2
    return pipe


BUILDERS = {
    "sd15": lambda: sd_pipeline(linear_projection=False),
    "sd21": lambda: sd_pipeline(linear_projection=True, prediction_type="v_prediction"),
    "sdxl": sdxl_pipeline,
    "pixart": pixart_pipeline,
    "sd3": sd3_pipeline,
    "flux": flux_pipeline,
    "flux2": flux2_pipeline,
    "flux2_klein": flux2_klein_pipeline,
    "chroma": chroma_pipeline,
    "qwenimage": qwenimage_pipeline,
    "zimage": zimage_pipeline,
    "ernie_image": ernie_image_pipeline,
    "krea2": krea2_pipeline,
    "hidream": hidream_pipeline,
    "qwenimage21": qwenimage21_pipeline,
}

# Call arguments each family needs on top of prompt/size/steps (text lengths kept tiny).
CALL_KWARGS = {
    "sd15": {"guidance_scale": 5.0},
    "sd21": {"guidance_scale": 5.0},
    "sdxl": {"guidance_scale": 5.0},
    "pixart": {"guidance_scale": 4.5, "use_resolution_binning": False, "max_sequence_length": TEXT_LEN},
    "sd3": {"guidance_scale": 5.0, "max_sequence_length": TEXT_LEN},
    "flux": {"guidance_scale": 3.5, "max_sequence_length": TEXT_LEN},
    "flux2": {"guidance_scale": 4.0, "max_sequence_length": TEXT_LEN},
    "flux2_klein": {"guidance_scale": 4.0, "max_sequence_length": TEXT_LEN},
    "chroma": {"guidance_scale": 5.0, "max_sequence_length": TEXT_LEN},
    # Qwen-Image runs CFG only as true CFG (a negative prompt and true_cfg_scale > 1); plain calls run none.
    "qwenimage": {"true_cfg_scale": 1.0, "max_sequence_length": TEXT_LEN},
    # Z-Image (base) runs CFG as cond + s (cond - uncond); Turbo runs s = 0.
    "zimage": {"guidance_scale": 3.0, "max_sequence_length": TEXT_LEN},
    "ernie_image": {"guidance_scale": 4.0},  # no prompt rewriter (pe) in the tiny model
    # Krea-2 combines cond + s (cond - uncond): CFG runs at any s > 0.
    "krea2": {"guidance_scale": 4.5, "max_sequence_length": TEXT_LEN},
    "hidream": {"guidance_scale": 5.0, "max_sequence_length": TEXT_LEN},
    # Qwen-Image 2.1 runs CFG only as true CFG (a negative prompt and true_cfg_scale > 1).
    "qwenimage21": {"true_cfg_scale": 1.0},
}

FAMILY_NAMES = tuple(BUILDERS)
# How each family runs classifier-free guidance in its tiny model's default call (CALL_KWARGS):
# one denoiser call per step on [uncond, cond] ("batched" families), a cond call then an uncond call
# (SEPARATE_CFG: Flux and Qwen-Image only with true CFG arguments, Klein and Chroma at guidance_scale > 1),
# or none. Z-Image batches [cond, uncond].
SEPARATE_CFG = tuple(f.name for f in FAMILIES if f.name in BUILDERS and f.cfg_separate)
NO_CFG = tuple(f.name for f in FAMILIES if f.name in BUILDERS and not f.runs_cfg)  # Flux.2 [dev]'s feeds an embedding
# Extra call arguments that turn CFG on where the default call runs none (Flux, Qwen-Image: true CFG).
CFG_ARGUMENTS = {"flux": {"true_cfg_scale": 3.0, "negative_prompt": "a blue square"},
                 "qwenimage": {"true_cfg_scale": 3.0, "negative_prompt": "a blue square"},
                 "qwenimage21": {"true_cfg_scale": 3.0, "negative_prompt": "a blue square"}}
# Families whose VAE decodes other than 3 channels (Qwen-Image 2.1: RGBA).
IMAGE_CHANNELS = {"qwenimage21": 4}
# Families whose attention is joint text-image attention (text keys beside image keys).
JOINT_ATTENTION = ("sd3", "flux", "flux2", "flux2_klein", "chroma", "qwenimage")


def build(family: str):
    pipe = BUILDERS[family]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, family: str, size: int | tuple[int, int] = 64, steps: int = 3, seed: int = 0, **overrides):
    """Run `pipe` once and return its images (a "pt" tensor unless `output_type` says otherwise;
    deterministic for a seed)."""
    height, width = (size, size) if isinstance(size, int) else size
    kwargs = dict(CALL_KWARGS[family], output_type="pt")
    kwargs.update(overrides)
    bind = kwargs.pop("_bind", None)
    if bind is not None:
        bind["pipe"] = pipe
    return pipe(
        prompt="a red circle",  # by name: Flux.2's first parameter is `image`
        height=height,
        width=width,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        **kwargs,
    ).images


def step_callback(family: str, fn) -> dict:
    """Call arguments that run `fn(pipe, step)` after every step (PixArt-Sigma has the legacy API)."""
    if family == "pixart":
        pipe_ref = {}

        def legacy(step, timestep, latents):
            fn(pipe_ref["pipe"], step)

        return {"callback": legacy, "callback_steps": 1, "_bind": pipe_ref}

    def modern(pipe, step, timestep, kwargs):
        fn(pipe, step)
        return {}

    return {"callback_on_step_end": modern}
