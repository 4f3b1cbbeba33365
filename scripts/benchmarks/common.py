"""What every benchmark section shares: the result table and timing as ratios within one run."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable


@dataclasses.dataclass
class Table:
    title: str
    what: str  # what was measured, on what, how many runs
    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", self.what, "", "| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


def interleaved_times(functions: dict[str, Callable[[], object]], runs: int, warmup: int = 1,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each function over `runs` rounds, run in alternation so drift hits all alike.

    `clock=time.process_time` counts this process's CPU seconds: on a machine shared with other
    jobs, wall time mostly measures their load."""
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    times = {name: [] for name in functions}
    for _ in range(runs):
        for name, fn in functions.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


def ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median-time ratio of two entries measured in the same interleaved run."""
    return statistics.median(times[numerator]) / statistics.median(times[denominator])


def fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


# Full-size UNet configs from the public model cards' config.json values (no hub access).
FULL_SIZE_UNETS = {
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    ),
    "sd21": dict(
        sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}


def full_size_unet(family: str, device: str = "meta"):
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**FULL_SIZE_UNETS[family]).eval()

# Public config.json values of black-forest-labs/FLUX.1-dev's transformer, written out: no hub access.
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

# Public config.json values of Qwen/Qwen-Image's transformer and VAE, written out: no hub access.
QWEN_IMAGE = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)
QWEN_IMAGE_VAE = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0,
    latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                  -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                 1.6382, 1.1253, 2.8251, 1.916],
)
