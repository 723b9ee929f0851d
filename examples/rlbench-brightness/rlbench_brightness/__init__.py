"""Mean brightness (ITU-R BT.601 luma) of each image, in [0, 1]."""

import torch

from rlbench import Reward


class Brightness(Reward):
    """Mean BT.601 luma of the image: 0 for black, 1 for white."""

    name = "brightness"
    version = "1"
    summary = "Mean image brightness (BT.601 luma), in [0, 1]."
    score_range = "[0, 1]"

    def score(self, images, prompts, metadata):
        luma = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
        return (images * luma).sum(dim=1).mean(dim=(1, 2))
