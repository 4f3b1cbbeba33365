"""What techniques build on: the stage engine, schedule / wavelet / resize math, the latent layouts' adapters
and the VAE codec."""
