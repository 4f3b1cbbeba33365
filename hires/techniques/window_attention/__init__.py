"""Image self-attention in shifted windows of the base size's token count (mechanism: `windows`)."""

from ...registry import Technique
from .config import WindowAttentionConfig

# Before entropy scaling (50), which counts the keys a query sees in its window.
TECHNIQUE = Technique("window_attention", WindowAttentionConfig, f"{__name__}.windows:install", order=40,
                      capabilities={"torch_sdpa"})
