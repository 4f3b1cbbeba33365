"""hires on Modular Diffusers pipelines (`diffusers.ModularPipeline`: a block graph run on a `PipelineState`).

`hires.apply(modular_pipe)` attaches as to a classic pipeline; three things differ, and they live here:
- the call boundary: every denoise loop is a `LoopSequentialPipelineBlocks` that runs its steps inside
  `with self.progress_bar(total=...)`, so hires shadows that method on each loop block of the pipeline's own
  graph (`pipe._blocks`), and reads the call's values from the loop's `PipelineState` and the guider;
- CFG: a modular pipeline runs it through its guider component as separate passes, cond first, whatever the
  classic pipeline does (SDXL and Z-Image batch it), so the family's guidance facts come from the guider
  (`modular_info`);
- staged techniques (structure guidance, bottleneck sampling): `HiresStagesStep` wraps the graph's `denoise`
  entry and runs it once per stage on a copy of the state; each stage starts from its planned latent when its
  loop opens. `hires.apply` makes that edit on `pipe._blocks` (and `hires.remove` undoes it); a graph built by
  hand can carry the block itself (`HiresStagesStep(blocks.sub_blocks["denoise"], config)`), and a folder
  written by `save_block_folder` loads it with `ModularPipelineBlocks.from_pretrained(folder,
  trust_remote_code=True)`.
"""

from .blocks import (
    BLOCK_FILE,
    HiresStagesStep,
    attach,
    check_guider,
    drop_unloaded_steps,
    is_modular,
    loop_blocks,
    modular_info,
    save_block_folder,
)

__all__ = ["BLOCK_FILE", "HiresStagesStep", "attach", "check_guider", "drop_unloaded_steps", "is_modular",
           "loop_blocks", "modular_info", "save_block_folder"]
