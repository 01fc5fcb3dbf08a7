"""Training: configuration, curriculum, checkpoints, the loop and scale-out."""
