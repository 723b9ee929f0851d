"""Run by tests/test_training_e2e.py under torch.distributed.run with 2 CPU processes (gloo).

Trains one epoch and writes each replica's trainable weights to <out>/replica<rank>.safetensors,
plus the rewards it sampled, so the test can check that the replicas saw different data and
still hold identical weights (gradients really all-reduced).

With algo ``grpo`` the images come in groups of 2 and process 0's rewards are made flat (no signal: GRPO's
filter leaves it nothing to train), so the processes would run different numbers of micro-batches unless
GRPO pads them to the same count; a hang here is that bug.
"""

import json
import sys

import torch
from pathlib import Path

from safetensors.torch import save_file

from rlbench.algorithm import make_algorithm
from rlbench.config import load_config
from rlbench.diffusion.policy import load_policy
from rlbench.prompts import load_prompts
from rlbench.registry import make_reward
from rlbench.train.trainer import Trainer

model, out, algo = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
cfg = load_config(
    overrides=[
        "sample.num_steps=2", "sample.batch_size=2", "sample.num_batches_per_epoch=1",
        "train.batch_size=2", "train.gradient_accumulation_steps=1", "logging.tensorboard=false",
        "logging.samples_every=0", "advantage.per_prompt=false", "model.device=cpu",
        *(["sample.images_per_prompt=2"] if algo == "grpo" else []),
    ],
    values={"run": {"epochs": 1, "out": str(out / "run")}, "algorithm": {"name": algo},
            "model": {"name": model}, "prompts": {"name": "simple-animals"}},
)
algorithm = make_algorithm(cfg)
trainer = Trainer(cfg, load_policy(model), make_reward("incompressibility"), algorithm,
                  load_prompts("simple-animals"), log=None)
initial = {k: v.clone() for k, v in trainer.policy.named_trainable_state().items()}
rewards = []
orig_score = trainer._score


def spy(images, prompts, metadata):
    out = orig_score(images, prompts, metadata)  # (scores, seconds, components)
    if algo == "grpo" and trainer.rank == 0:
        out = (torch.full_like(out[0], 0.5), *out[1:])
    rewards.extend(out[0].tolist())
    return out


trainer._score = spy
trainer.run()
rank = trainer.rank
save_file({k: v.contiguous() for k, v in trainer.policy.named_trainable_state().items()},
          str(out / f"replica{rank}.safetensors"))
save_file(initial, str(out / f"initial{rank}.safetensors"))
(out / f"rewards{rank}.json").write_text(json.dumps({"rewards": rewards, "world": trainer.world}))
