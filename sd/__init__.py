"""The Lightning-free Stable Diffusion layer (SD 1.x, 2.x, XL): models, adapters, export, rendering, training."""
