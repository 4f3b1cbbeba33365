"""Real-size Flux.2 [dev] data for the planner and FLOP tables: public config values written out (no hub
access), a builder on the meta device and one forward's inputs.

Values: black-forest-labs/FLUX.2-dev transformer/config.json and vae/config.json (8 double + 48 single
blocks, 48 heads of 128, Mistral-Small-3.1 context of 3 x 5120, 4-axis RoPE of 32 each, theta 2000;
32-channel VAE, patchified 2x2 to 128 channels). They are also diffusers' Flux2Transformer2DModel and
AutoencoderKLFlux2 defaults.
"""

from __future__ import annotations

import torch

FLUX2_DEV = dict(
    patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
    num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=True,
)
FLUX2_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=32, norm_num_groups=32, use_quant_conv=True, use_post_quant_conv=True, patch_size=(2, 2),
)
TEXT_TOKENS = 512  # Flux2Pipeline's max_sequence_length


def models():
    """(transformer, VAE) of Flux.2 [dev] on the meta device."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    with torch.device("meta"):
        return Flux2Transformer2DModel(**FLUX2_DEV).eval(), AutoencoderKLFlux2(**FLUX2_VAE).eval()


def inputs(size: int) -> dict:
    """One forward at size x size px: ids (time, row, column, layer) as Flux2Pipeline builds them."""
    side = size // 16
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    zeros = torch.zeros_like(rows)
    img_ids = torch.stack([zeros, rows, cols, zeros], -1).reshape(-1, 4).float()
    txt_ids = torch.stack([torch.zeros(TEXT_TOKENS), torch.zeros(TEXT_TOKENS), torch.zeros(TEXT_TOKENS),
                           torch.arange(TEXT_TOKENS).float()], -1)
    return dict(hidden_states=torch.empty(1, side * side, FLUX2_DEV["in_channels"], device="meta"),
                encoder_hidden_states=torch.empty(1, TEXT_TOKENS, FLUX2_DEV["joint_attention_dim"], device="meta"),
                timestep=torch.ones(1, device="meta"), img_ids=img_ids.to("meta"), txt_ids=txt_ids.to("meta"),
                guidance=torch.ones(1, device="meta"))
