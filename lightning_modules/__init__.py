"""The LightningModule (dreambooth.py) and what it alone uses: its optimizers (optim, fused_optim), the average of
its trained weights (ema), its memory switches (memory), its guards against non-finite numbers (numerics) and the
sharded strategies it runs under (strategies). The Lightning-free Stable Diffusion layer it drives is :mod:`sd`."""
