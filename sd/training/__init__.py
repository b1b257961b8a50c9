"""The training math: the DreamBooth objective, loss recipes, the held-out loss."""
