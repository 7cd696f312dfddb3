"""Training: the KL autoencoder (autoencoder.py) and the latent diffusion model (diffusion.py), a shared
optimisation loop (loop.py), the LitEma average (ema.py) and original-layout checkpoints (checkpoint_io.py)."""
