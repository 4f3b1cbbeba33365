"""HiFlow's flow-aligned guidance in the upscaled stages of structure guidance (mechanism: `alignment`)."""

from ...registry import Technique
from .config import FlowAlignmentConfig

# After structure guidance (10), whose planner and hook must come first, before bottleneck (20).
# Batched CFG: the previous step's velocity is the combination of the batch's two halves.
TECHNIQUE = Technique("flow_alignment", FlowAlignmentConfig, f"{__name__}.alignment:install", order=12,
                      planner=f"{__name__}.alignment:FlowAlignment",
                      capabilities={"whole_cfg_batch"},
                      requires={"structure_guidance": "it guides structure guidance's upscaled stages"})
