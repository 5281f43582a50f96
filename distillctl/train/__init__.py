"""Training: the method-agnostic loop, checkpoints and torchrun helpers."""
