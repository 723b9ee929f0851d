"""The shapes world's CLIP-style proxy reward (``shapes-clip``): architecture, training, evaluation.

``shapes-clip`` is to the shapes world what CLIPScore / PickScore are to real text-to-image models: a
small dual encoder trained contrastively on (image, caption) pairs. It is deliberately trained on
LIMITED data (tens of thousands of pairs, captions of the train prompt space only) so that it is a
good but imperfect, exploitable proxy of the exact gold reward ``shapes-gold``; DDPO trained
against it while the gold is watched shows reward over-optimisation.

Architecture: transformers' own :class:`~transformers.CLIPModel` with a tiny :class:`CLIPConfig`:

* vision tower: a ViT on 32x32 images, 4x4 patches (64 patches + CLS), see :data:`VISION_CONFIG`;
* text tower: a causal transformer over the world's word-level CLIP BPE tokenizer
  (:func:`rlbench.shapes.model.write_tokenizer`), pooled at the EOS token, see :data:`TEXT_CONFIG`;
* linear projections of both to :data:`EMBED_DIM`, and a learned ``logit_scale`` initialised at
  ``log(1 / 0.07)`` and clamped at ``log(100)`` during training, as in CLIP.

The saved weights form a standard Hugging Face folder (``config.json``, ``model.safetensors``,
tokenizer files) loadable with ``CLIPModel.from_pretrained(folder)``, plus ``metrics.json`` (how
it was trained and how well it agrees with the gold). The shipped copy lives in the package at
``rlbench/shapes/proxies/clip/``; regenerate it with::

    python -m rlbench.shapes.clip_train --out rlbench/shapes/proxies/clip --threads 1

(about three minutes on one CPU core). The tokenizer of :func:`rlbench.shapes.model.write_tokenizer`
may number its tokens differently from one process to the next, and the trained weights with it; add
``--tokenizer-from rlbench/shapes/proxies/clip`` to reuse the shipped tokenizer and reproduce the
shipped weights bit for bit (same torch version and thread count).

Training data: ``n_pairs`` renders of :func:`rlbench.shapes.world.sample_batch` with
``exclude_heldout=True`` — captions of the whole train space (the 4,518 captions outside the
held-out spaces, a superset of the 448 ``shapes-train`` RL prompts); no held-out caption is ever seen.

Loss: symmetric InfoNCE over in-batch pairs. The caption space is small (single-object captions, a
third of the data, number 74), so a batch of 128 pairs usually repeats captions; the text
side of a batch is therefore its *distinct* captions:
image -> text is a cross-entropy over the distinct captions, text -> image a cross-entropy with
soft targets spread uniformly over the images sharing that caption. Captions that differ as strings
but are both true of an image (with and without a background clause, "A left of B" vs "B right of
A") remain false negatives, as in real CLIP training.

Images enter as float (B, 3, H, W) in [0, 1] (:func:`pixel_values`): area-resized to 32x32 in float
when needed (no uint8 quantisation, so the score stays differentiable), then mapped to [-1, 1].
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import torch
import torch.nn.functional as F

from rlbench.utils.hf import no_progress_bars
from rlbench.utils.stats import spearman
from rlbench.shapes.model import MAX_TOKENS, vocabulary, write_tokenizer
from rlbench.shapes.vocab import IMAGE_SIZE

PROXY_DIR = "proxies/clip"  # inside the rlbench.shapes package
EMBED_DIM = 128
VISION_CONFIG: dict[str, Any] = {
    "image_size": IMAGE_SIZE,
    "patch_size": 4,
    "num_channels": 3,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
}
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP's clamp: exp(logit_scale) <= 100
PIXEL_MEAN = 0.5  # [0, 1] -> [-1, 1]
PIXEL_STD = 0.5
TRAIN_COMMAND = "python -m rlbench.shapes.clip_train --out rlbench/shapes/proxies/clip"

# Evaluation (metrics.json and the tests): fixed seeds far from any training seed.
EVAL_SEED = 20_240_917
RETRIEVAL_CANDIDATES = 16


# -- model and preprocessing ------------------------------------------------------------------------


def shipped_clip() -> Path:
    """Folder of the shipped ``shapes-clip`` weights inside the installed package."""
    from importlib import resources

    return Path(str(resources.files("rlbench.shapes").joinpath(PROXY_DIR)))


REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


def clip_folder(weights: str | Path | None, *, reward: str, option: str) -> Path:
    """The shapes-clip folder a reward uses (``weights``, default the shipped one), checked complete."""
    from rlbench.errors import WeightsNotAvailable

    folder = Path(weights) if weights is not None else shipped_clip()
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        where = "are not in this installation" if weights is None else "are not in the given folder"
        raise WeightsNotAvailable(
            f"reward '{reward}': the shapes-clip weights {where} ({folder}: missing {', '.join(missing)}). "
            f"Train them with `{TRAIN_COMMAND}` (a few CPU minutes), or pass {option}=DIR of a folder written "
            "by `python -m rlbench.shapes.clip_train --out DIR`."
        )
    return folder


def new_clip(tokenizer, seed: int = 0):
    """A randomly initialised tiny :class:`~transformers.CLIPModel` for ``tokenizer``'s vocabulary."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(TEXT_CONFIG, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(text_config=text, vision_config=dict(VISION_CONFIG), projection_dim=EMBED_DIM,
                        logit_scale_init_value=LOGIT_SCALE_INIT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model


def load_clip(folder: str | Path):
    """(model, tokenizer) of a saved shapes-clip folder; the model in eval mode, frozen, on CPU."""
    from transformers import CLIPModel, CLIPTokenizer

    with no_progress_bars():
        model = CLIPModel.from_pretrained(str(folder))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_TOKENS)
    model.eval().requires_grad_(False)
    return model, tokenizer


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> the vision tower's input: area-resized to 32x32 in float
    (``adaptive_avg_pool2d``; no uint8 quantisation, so gradients flow), then mapped to [-1, 1]."""
    x = images.float()
    if tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.adaptive_avg_pool2d(x, IMAGE_SIZE)
    return (x - PIXEL_MEAN) / PIXEL_STD


def uint8_to_float(images: np.ndarray) -> torch.Tensor:
    """World renders (B, 32, 32, 3) uint8 -> (B, 3, 32, 32) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids (N, MAX_TOKENS): BOS, words, EOS, padded with EOS; longer prompts are truncated."""
    return tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                     return_tensors="pt").input_ids


def image_embeds(model, pixels: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings: the CLS output of the vision tower, projected."""
    pooled = model.vision_model(pixel_values=pixels).pooler_output
    return F.normalize(model.visual_projection(pooled), dim=-1)


def text_embeds(model, input_ids: torch.Tensor) -> torch.Tensor:
    """L2-normalised text embeddings: the EOS output of the (causal) text tower, projected."""
    pooled = model.text_model(input_ids=input_ids).pooler_output
    return F.normalize(model.text_projection(pooled), dim=-1)


# -- training ---------------------------------------------------------------------------------------


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of a shapes-clip (or write_tokenizer) folder into ``dst``."""
    import shutil

    if not (src / "vocab.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {src} (vocab.json missing)")
    if src.resolve() == dst.resolve():
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def make_pairs(n_pairs: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """The fixed, limited training set: ``n_pairs`` renders with their captions, train space only."""
    from rlbench.shapes.world import sample_batch

    images, captions, _ = sample_batch(np.random.default_rng([seed, 0]), n_pairs, exclude_heldout=True)
    return images, captions


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, caption_index: torch.Tensor,
                     scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between B images and U distinct captions (``caption_index[i]``: image i's).

    image -> text: cross-entropy over the U distinct captions; text -> image: cross-entropy with soft
    targets, uniform over the images that share the caption. With all captions distinct this is
    exactly CLIP's loss.
    """
    logits = scale * img @ txt.t()  # (B, U)
    target = F.one_hot(caption_index, txt.shape[0]).to(logits.dtype)  # (B, U)
    i2t = -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()
    t2i = -((target * logits.log_softmax(dim=0)).sum(dim=0) / target.sum(dim=0)).mean()
    return (i2t + t2i) / 2


def train_clip(
    out: str | Path,
    n_pairs: int = 30_000,
    steps: int = 600,
    batch_size: int = 128,
    seed: int = 0,
    *,
    lr: float = 1e-3,
    warmup: int = 100,
    weight_decay: float = 0.05,
    eval_pairs: int = 2_000,
    tokenizer_from: str | Path | None = None,
    log: Callable[[str], None] | None = print,
    log_every: int = 100,
) -> dict[str, Any]:
    """Train shapes-clip from scratch on ``n_pairs`` fixed renders of the train space; save to ``out``.

    Args:
        out: folder to write (HF CLIPModel folder + tokenizer + ``metrics.json``).
        n_pairs: size of the fixed training set (limited on purpose: the proxy must stay exploitable).
        steps: optimiser steps; each draws ``batch_size`` pairs of the set without replacement.
        batch_size: pairs per step.
        seed: seeds the data, the initialisation and the batch order.
        lr, warmup, weight_decay: AdamW with linear warm-up and cosine decay.
        eval_pairs: pairs per split of the final agreement measurement (0: skip it).
        tokenizer_from: a folder whose tokenizer files to reuse (e.g. the shipped weights', to
            reproduce them); default: a fresh :func:`~rlbench.shapes.model.write_tokenizer`, whose
            token ids may differ from run to run (the BPE trainer's tie order), and with them the
            trained weights.
        log: progress printer (None: silent).

    Returns:
        The metrics written to ``out/metrics.json``: training setup, time, final loss and, unless
        ``eval_pairs`` is 0, the agreement with shapes-gold (see :func:`evaluate`).
    """
    out = Path(out)
    t0 = time.perf_counter()
    images, captions = make_pairs(n_pairs, seed)
    data_seconds = time.perf_counter() - t0
    from transformers import CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is None:  # first, so the tokenizer files sit next to the weights
        write_tokenizer(out, vocabulary())
    else:
        copy_tokenizer(Path(tokenizer_from), out)
    tokenizer = CLIPTokenizer.from_pretrained(str(out), model_max_length=MAX_TOKENS)
    model = new_clip(tokenizer, seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    rng = np.random.default_rng([seed, 1])
    order = rng.permutation(n_pairs)
    pos, running, t_train = 0, 0.0, time.perf_counter()
    loss_value = float("nan")
    for step in range(steps):
        if pos + batch_size > n_pairs:
            order, pos = rng.permutation(n_pairs), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        batch_captions = [captions[i] for i in idx]
        distinct = list(dict.fromkeys(batch_captions))
        where = {c: k for k, c in enumerate(distinct)}
        caption_index = torch.tensor([where[c] for c in batch_captions])
        img = image_embeds(model, pixel_values(uint8_to_float(images[idx])))
        txt = text_embeds(model, tokenize(tokenizer, distinct))
        loss = contrastive_loss(img, txt, caption_index, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
        loss_value = float(loss.detach())
        running += loss_value
        if log is not None and (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps}  loss {running / log_every:.4f}  "
                f"scale {float(model.logit_scale.detach().exp()):.1f}  {time.perf_counter() - t0:.0f}s")
            running = 0.0
    train_seconds = time.perf_counter() - t_train
    model.eval().requires_grad_(False)
    with no_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
    metrics: dict[str, Any] = {
        "reward": "shapes-clip",
        "architecture": {"model": "transformers.CLIPModel", "embed_dim": EMBED_DIM, "vision": VISION_CONFIG,
                         "text": TEXT_CONFIG, "parameters": sum(p.numel() for p in model.parameters()),
                         "pixel_mean": PIXEL_MEAN, "pixel_std": PIXEL_STD},
        "training": {"n_pairs": n_pairs, "distinct_captions": len(set(captions)), "steps": steps,
                     "batch_size": batch_size, "epochs": steps * batch_size / n_pairs, "lr": lr,
                     "warmup": warmup, "weight_decay": weight_decay, "seed": seed,
                     "data": f"rlbench.shapes.world.sample_batch(numpy.random.default_rng([{seed}, 0]), {n_pairs}, "
                             "exclude_heldout=True), no augmentation",
                     "loss": "symmetric InfoNCE over the distinct captions of each batch (soft targets "
                             "for images sharing a caption)",
                     "command": f"python -m rlbench.shapes.clip_train --out DIR --n-pairs {n_pairs} --steps {steps} "
                                f"--batch-size {batch_size} --lr {lr:g} --seed {seed} --threads {torch.get_num_threads()}"
                                + (f" --tokenizer-from {tokenizer_from}" if tokenizer_from is not None else ""),
                     "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "python": platform.python_version(),
                     "reproducibility": ("bit-identical weights on the same torch version and thread count "
                                         "given the same tokenizer (--tokenizer-from this folder); a fresh "
                                         "tokenizer may number its tokens differently"),
                     "data_seconds": round(data_seconds, 1),
                     "train_seconds": round(train_seconds, 1), "final_loss": loss_value,
                     "logit_scale_exp": float(model.logit_scale.exp())},
    }
    if eval_pairs:
        t_eval = time.perf_counter()
        metrics["evaluation"] = evaluate(ClipScorer(model, tokenizer), n=eval_pairs)
        metrics["evaluation"]["seconds"] = round(time.perf_counter() - t_eval, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if log is not None and "evaluation" in metrics:
        log(json.dumps(metrics["evaluation"], indent=2))
    return metrics


# -- evaluation -------------------------------------------------------------------------------------


class ClipScorer:
    """``scorer(images float (B,3,H,W), prompts) -> np.ndarray``: logit_scale.exp() * cos, batched."""

    def __init__(self, model, tokenizer, batch_size: int = 512) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> np.ndarray:
        distinct = list(dict.fromkeys(prompts))
        txt = torch.cat([text_embeds(self.model, tokenize(self.tokenizer, distinct[s : s + self.batch_size]))
                         for s in range(0, len(distinct), self.batch_size)])
        img = torch.cat([image_embeds(self.model, pixel_values(images[s : s + self.batch_size]))
                         for s in range(0, images.shape[0], self.batch_size)])
        where = {p: k for k, p in enumerate(distinct)}
        cos = (img * txt[[where[p] for p in prompts]]).sum(-1)
        return (self.model.logit_scale.exp() * cos).numpy()


def prompt_pool(split: str) -> list[str]:
    """``"train"``: the shapes-train prompts; ``"heldout"``: the union of the three held-out splits;
    or one split name of :func:`~rlbench.shapes.grammar.split_prompts`."""
    from rlbench.shapes.grammar import split_prompts

    splits = split_prompts()
    if split == "heldout":
        return [p for name, ps in splits.items() if name != "train" for p in ps]
    return list(splits[split])


def agreement_pairs(pool: Sequence[str], n: int, seed: int = EVAL_SEED
                    ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``n`` fresh (image, prompt) pairs over a prompt pool, and their gold scores.

    Each image renders a random caption of the pool; its prompt is that caption with probability
    1/2, else another random caption of the pool (so the gold varies over [0, 1]).
    """
    from rlbench.shapes.analyser import gold_scores
    from rlbench.shapes.world import render_batch, scene_for_prompt

    rng = np.random.default_rng([seed, len(pool), n])
    own = [pool[int(i)] for i in rng.integers(0, len(pool), size=n)]
    images = render_batch([scene_for_prompt(c, rng) for c in own])
    prompts = []
    for caption in own:
        other = caption
        if rng.random() >= 0.5:
            while other == caption:
                other = pool[int(rng.integers(len(pool)))]
        prompts.append(other)
    return images, prompts, gold_scores(images, prompts)


def retrieval_accuracy(scorer: Callable[[torch.Tensor, Sequence[str]], np.ndarray], pool: Sequence[str],
                       n: int, seed: int = EVAL_SEED, candidates: int = RETRIEVAL_CANDIDATES) -> float:
    """Top-1 accuracy of picking an image's own caption among ``candidates`` captions of the pool
    (the others drawn at random among captions whose gold on that image is below 1: all wrong)."""
    from rlbench.shapes.analyser import gold_scores
    from rlbench.shapes.world import render_batch, scene_for_prompt

    rng = np.random.default_rng([seed, len(pool), n, candidates])
    own = [pool[int(i)] for i in rng.integers(0, len(pool), size=n)]
    images = render_batch([scene_for_prompt(c, rng) for c in own])
    lists = []
    for image, caption in zip(images, own):
        draws = [pool[int(i)] for i in rng.choice(len(pool), size=min(len(pool), 3 * candidates), replace=False)]
        draws = [d for d in dict.fromkeys(draws) if d != caption]
        gold = gold_scores(np.repeat(image[None], len(draws), axis=0), draws)
        wrong = [d for d, g in zip(draws, gold) if g < 1.0][: candidates - 1]
        lists.append([caption] + wrong)
    flat_images = np.concatenate([np.repeat(im[None], len(c), axis=0) for im, c in zip(images, lists)])
    scores = scorer(uint8_to_float(flat_images), [c for cs in lists for c in cs])
    hits, start = 0, 0
    for cs in lists:
        block = scores[start : start + len(cs)]
        hits += int(np.argmax(block) == 0)
        start += len(cs)
    return hits / n


def evaluate(scorer: Callable[[torch.Tensor, Sequence[str]], np.ndarray], n: int = 2_000,
             seed: int = EVAL_SEED, retrieval_n: int | None = None) -> dict[str, Any]:
    """Agreement of a proxy scorer with shapes-gold, for train and held-out prompts.

    Per pool (``train``; ``heldout``, the union of the held-out splits): Spearman rank correlation
    over ``n`` pairs of :func:`agreement_pairs`, the same restricted to the mismatched pairs (how well
    the proxy ranks partly-wrong captions), the mean proxy score of matching and mismatched pairs,
    and image -> caption retrieval accuracy among :data:`RETRIEVAL_CANDIDATES` (over ``retrieval_n``
    images, default ``n // 2``). For held-out prompts also the Spearman correlation within each
    held-out split (``n // 2`` pairs each, prompts and distractors from that split).
    """
    result: dict[str, Any] = {"pairs": n, "seed": seed, "retrieval_candidates": RETRIEVAL_CANDIDATES}
    for split in ("train", "heldout"):
        pool = prompt_pool(split)
        images, prompts, gold = agreement_pairs(pool, n, seed)
        proxy = scorer(uint8_to_float(images), prompts)
        own = gold >= 1.0
        result[split] = {
            "spearman": spearman(proxy, gold),
            "spearman_gold_below_1": spearman(proxy[~own], gold[~own]),
            "mean_score_gold_1": float(proxy[own].mean()),
            "mean_score_gold_below_1": float(proxy[~own].mean()),
            "retrieval_top1": retrieval_accuracy(scorer, pool, retrieval_n or n // 2, seed),
        }
    for split in ("heldout-combos", "heldout-counts", "heldout-relations"):
        images, prompts, gold = agreement_pairs(prompt_pool(split), n // 2, seed)
        result["heldout"].setdefault("spearman_by_split", {})[split] = spearman(
            scorer(uint8_to_float(images), prompts), gold)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlbench.shapes.clip_train",
                                     description="Train the shapes-clip proxy reward (a tiny CLIP) from scratch.")
    parser.add_argument("--out", required=True, type=Path, help="output folder (shipped: rlbench/shapes/proxies/clip)")
    parser.add_argument("--n-pairs", type=int, default=30_000, help="size of the fixed training set")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-pairs", type=int, default=2_000)
    parser.add_argument("--tokenizer-from", type=Path, default=None,
                        help="reuse this folder's tokenizer files (reproduce shipped weights exactly)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_clip(args.out, n_pairs=args.n_pairs, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
               lr=args.lr, eval_pairs=args.eval_pairs, tokenizer_from=args.tokenizer_from)


if __name__ == "__main__":
    main()
