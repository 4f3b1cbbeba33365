"""What hires does to a denoiser call that several techniques share: the CFG-pair hook, the attention wrapper."""
