"""Diffusion-sampling building blocks for RL fine-tuning (DDPO policy steps)."""

from rlbench.diffusion.ddim import ddim_step_with_logprob

__all__ = ["ddim_step_with_logprob"]
