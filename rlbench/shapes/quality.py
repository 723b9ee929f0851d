"""Quality of a shapes-world model, measured by the gold analyser.

For each prompt split: sample images for ``n`` prompts of the split, score each image against its
own prompt (``matching``) and against another prompt of the same batch (``mismatched``). A
prompt-following model scores matching far above mismatched; per-template rows show where it fails
(counts, relations).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from rlbench.utils.images import to_uint8


def sample_images(policy, prompts: Sequence[str], *, num_steps: int = 20, guidance_scale: float = 5.0,
                  seed: int = 0, batch_size: int = 64, sampler=None) -> np.ndarray:
    """uint8 (N,32,32,3) samples: the stochastic DDIM policy (eta = 1, as DDPO trains it) or ``sampler`` (a
    :class:`~rlbench.diffusion.sampler.Sampler`, e.g. a flow model's ode or flow-sde)."""
    gen = torch.Generator().manual_seed(seed)
    neg = policy.encode_prompts([""])
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        images = policy.sample(chunk, num_steps=num_steps, eta=1.0, sampler=sampler, guidance_scale=guidance_scale,
                               generator=gen, neg_embeds=neg).images
        out.append(to_uint8(images, layout="hwc"))
    return np.concatenate(out)


def quality_table(policy, splits: Sequence[str] | None = None, n: int = 256, *, num_steps: int = 20,
                  guidance_scale: float = 5.0, seed: int = 0, sampler=None) -> pd.DataFrame:
    """Rows: split, template, n, matching (mean gold of own prompt), mismatched (another prompt's), aesthetic_gold
    (mean ``shapes-aesthetic-gold``: prompt-independent)."""
    from rlbench.shapes.aesthetic import aesthetic_gold
    from rlbench.shapes.analyser import gold_scores
    from rlbench.shapes.grammar import parse_caption, split_prompts

    from rlbench.errors import ConfigError

    all_splits = split_prompts()
    unknown = [s for s in splits or [] if s not in all_splits]
    if unknown:
        raise ConfigError(f"unknown shapes split(s) {unknown}; choose from {', '.join(all_splits)}.")
    rows = []
    for split in splits or list(all_splits):
        pool = all_splits[split]
        rng = np.random.default_rng([seed, len(pool)])
        prompts = [pool[i] for i in rng.integers(0, len(pool), size=n)]
        images = sample_images(policy, prompts, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed,
                               sampler=sampler)
        matching = gold_scores(images, prompts)
        # The next prompt in a shuffled order, resampled where it equals the image's own prompt.
        others = [prompts[(i + 1 + int(rng.integers(0, n - 1))) % n] for i in range(n)]
        mismatched = gold_scores(images, others)
        templates = [parse_caption(p).template for p in prompts]
        frame = pd.DataFrame({"template": templates, "matching": matching, "mismatched": mismatched,
                              "aesthetic_gold": aesthetic_gold(images)})
        for template, part in [("all", frame), *frame.groupby("template")]:
            rows.append({"split": split, "template": template, "n": len(part),
                         "matching": float(part["matching"].mean()), "mismatched": float(part["mismatched"].mean()),
                         "aesthetic_gold": float(part["aesthetic_gold"].mean())})
    return pd.DataFrame(rows)
