"""A sanity probe of the RL machinery on the shapes models: `rlbench train` with two extra rewards, ``bright``
and ``crisp``.

    python benchmarks/shapes_brightness_probe.py train --model shapes --algo grpo --reward bright \\
        --prompts shapes-train --set run.epochs=12 ...

``crisp`` is the fraction of pixels the gold analyser snaps to a palette colour (clean colours, the first thing
the gold needs of an object). ``bright`` is the mean pixel value of the image in [0, 1] (prompt-independent and global: the easiest thing a
policy can learn). If GRPO raises it fast while it cannot raise ``shapes-gold``, the training loop, the
log-probabilities and the advantages work, and what limits the gold is what it asks of the model (exact
colours, crisp shapes, counts and positions), not the machinery. The reward is registered in this process only
(``REWARDS.register``); every other argument goes to the ``rlbench`` command line unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rlbench.reward import Reward, RewardOutput


class Bright(Reward):
    """Mean pixel value of the image, in [0, 1]."""

    name = "bright"
    version = "1"
    summary = "Mean pixel value in [0, 1] (a sanity probe: benchmarks/shapes_brightness_probe.py)."
    higher_is_better = True
    deterministic = True
    differentiable = True
    score_range = "[0, 1]"

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> RewardOutput:
        return RewardOutput(images.float().mean(dim=(1, 2, 3)), {})


class Crisp(Reward):
    """Fraction of the 32x32 image's pixels that the gold analyser snaps to a palette colour (within
    ``SNAP_MAX_DISTANCE``): how clean the colours are, whatever the image shows."""

    name = "crisp"
    version = "1"
    summary = "Fraction of pixels the gold analyser snaps to a palette colour (benchmarks/shapes_brightness_probe.py)."
    higher_is_better = True
    deterministic = True
    differentiable = False
    score_range = "[0, 1]"

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> RewardOutput:
        from rlbench.shapes.analyser import snap
        from rlbench.utils.images import to_uint8

        snapped = snap(to_uint8(images.detach().cpu().float(), layout="hwc"))
        return RewardOutput(torch.from_numpy((snapped >= 0).mean(axis=(1, 2))).float(), {})


def main() -> None:
    from rlbench.cli import main as cli_main
    from rlbench.registry import REWARDS

    REWARDS.register("bright", Bright)
    REWARDS.register("crisp", Crisp)
    sys.argv = ["rlbench", *sys.argv[1:]]
    cli_main()


if __name__ == "__main__":
    main()
