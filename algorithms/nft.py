"""``nft``: DiffusionNFT, negative-aware fine-tuning on the forward process (Zheng et al. 2025, arXiv 2509.16117).

After NVlabs/DiffusionNFT @24af555 (``scripts/train_nft_sd3.py``, ``config/nft.py``, ``config/base.py``; line
numbers below are that commit's). NFT needs no likelihoods and no trajectory: only each sample's final clean
latent x_0, its prompt and its reward, so any sampler serves (the reference samples deterministically: DPM-Solver
2M, CFG 1, ``config/nft.py`` L64-66; here ``sample.sampler = ode`` on flow models, ``sample.eta = 0`` on DDIM).

* **Advantages.** Group-normalised like GRPO: per-prompt mean, and with ``global_std`` (``config/base.py`` L57,
  not overridden by ``config/nft.py``) the std of all of the epoch's rewards (``flow_grpo/stat_tracking.py``
  L26-31); no buffer across epochs (``stat_tracker.clear()``, L769). Every group is trained, including flat ones
  (the reference has no zero-std filter: ``filtered_samples = collated_samples``, L793).
* **Per trained step** (L806-983). Each sample gets its own random order of the schedule's steps and trains the
  first ``int(window * train.timestep_fraction)`` of them (L810-816, L569; the reference is
  ``train.timestep_window = 1``, ``train.timestep_fraction = 0.99``: 9 of 10). At a step with key k, fresh noise
  eps gives ``x_t = noised(x_0, eps, k)`` (flow: ``(1 - sigma) x_0 + sigma eps``, L864-870; DDIM: add_noise), and
  three model outputs: ``o_old`` (the old policy, no grad), ``o`` (the current weights) and, when ``kl_beta > 0``,
  ``o_ref`` (the base model, no grad) (L872-907). Then :func:`nft_loss`.
* **The loss in x_0-space.** The reference regresses ``x0_hat = x_t - sigma v``; here every family predicts x_0
  from its own output (:meth:`Policy.predict_x0`: flow ``x_t - sigma v``; DDIM epsilon ``(x_t - sqrt(1 - a) eps) /
  sqrt(a)``; v-prediction ``sqrt(a) x_t - sqrt(1 - a) v``). The implicit policies are combinations of the outputs
  whose coefficients sum to 1, and x0_hat is affine in the output, so they are the same combinations of the
  x_0 predictions. On the flow family this is the reference exactly; on DDIM the x_0 error is the epsilon error
  times ``sqrt((1 - a_t) / a_t)`` (up to ~14.6 at SD's t = 981), where the flow family's factor is sigma <= 1:
  the self-normalised weights w^+- make each sample's loss linear in that factor, so noisy DDIM steps weigh more.
* **The old policy.** A slowly moving copy of the trainable tensors (LoRA adapters or the full denoiser), owned
  by this algorithm as a dict of tensors and swapped into the denoiser's parameters (``param.data``) for the
  o_old forward. It starts as the weights at the first update (the reference copies "default" into the "old"
  adapter before training, L576-580) and after every epoch becomes ``d old + (1 - d) theta`` (L1034-1039) with
  ``d = return_decay(global_step, decay_type)`` (L169-189), ``global_step`` the optimizer steps taken so far in
  the run, this epoch's included (incremented per optimizer step, L1021; the decay is read after the epoch).
* **Sampling.** The reference samples with the *old* adapter (L640-659) and evaluates with an EMA of the current
  weights. :meth:`NFT.sampling_weights` is that swap, for the trainer to enter around an epoch's sampling; until
  it does, epochs are sampled with the current weights (the same at epoch 0; with decay_type 1 the two differ by
  ``d (old - theta)`` with ``d <= 0.5``).
* **CFG.** DiffusionNFT is CFG-free (paper Sec. 3.3; NVlabs/DiffusionNFT#10): its configs sample with guidance 1
  and its training forward only handles CFG 1 (with guidance > 1 it concatenates the negative embeddings but
  not x_t, L839-851). So ``sample.guidance_scale`` must be 1 on classifier-free-guided models (UNets, SD3), and
  ``sample.true_cfg_scale`` 1 on FLUX, unless ``guided = true``: NFT on the guided policy, every forward (old,
  current, reference) guided as sampling is (needs ``train.cfg = true``; twice the compute). FLUX-dev's
  ``sample.guidance_scale`` is its guidance embedding, an input of one conditional forward, and is passed through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlbench.algorithm import Algorithm, TrainBatch, UpdateContext, option
from rlbench.algorithms.ddpo import steps_per_forward, trained_steps
from rlbench.errors import ConfigError, RunDirError
from rlbench.train.advantages import flat_group_fraction, group_normalize

# config/nft.py L61: config.beta = 1.0 (0.1 for sd3_ocr L77 and sd3_multi_reward L137).
BETA = 1.0
# config/nft.py L24 (and config/base.py L89): train.beta = 0.0001, the KL weight.
KL_BETA = 1e-4
# config/base.py L84: train.adv_clip_max = 5.
ADV_CLIP_MAX = 5.0
# config/nft.py L60: decay_type = 1 (2 for sd3_ocr, L78).
DECAY_TYPE = 1
# train_nft_sd3.py L945, L952: the adaptive weights are clipped below at 1e-5.
WEIGHT_MIN = 1e-5
# The old policy's tensors in a checkpoint folder (see NFT.save_tensors).
OLD_WEIGHTS_FILE = "nft_old_weights.safetensors"


# -- pure pieces ---------------------------------------------------------------------------------------

def old_decay(step: int, decay_type: int) -> float:
    """The old policy's decay after ``step`` optimizer steps: ``return_decay`` (train_nft_sd3.py L169-189).

    Type 0: always 0 (old = current after every epoch); type 1: ``min(0.001 step, 0.5)``; type 2: 0 for
    ``step < 75``, then ``min(0.0075 (step - 75), 0.999)``.
    """
    flat, rate, cap = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
    if step < flat:
        return 0.0
    return min((step - flat) * rate, cap)


def implicit_policies(out: torch.Tensor, out_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) implicit policies' outputs: ``beta o + (1 - beta) sg(o_old)`` and
    ``(1 + beta) sg(o_old) - beta o`` (train_nft_sd3.py L934-937)."""
    old = out_old.detach()
    return beta * out + (1 - beta) * old, (1.0 + beta) * old - beta * out


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def nft_loss(
    x0: torch.Tensor,
    out: torch.Tensor,
    out_old: torch.Tensor,
    advantages: torch.Tensor,
    to_x0: Callable[[torch.Tensor], torch.Tensor],
    *,
    beta: float = BETA,
    adv_clip_max: float = ADV_CLIP_MAX,
    out_ref: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's loss of one forward's (sample, step) rows (train_nft_sd3.py L910-970), float64.

    ``x0`` (B, ...) the clean latents, ``out``/``out_old``/``out_ref`` (B, ...) the current, old and reference
    model outputs at the rows' x_t, ``advantages`` (B,), ``to_x0`` maps an output to its x_0 prediction at those
    rows (flow: ``lambda v: x_t - sigma v``). Overbars are means over the non-batch dims::

        r    = clip(clip(A, +-A_max) / (2 A_max) + 1/2, 0, 1)                        L910-914, L928-929
        x0+- = to_x0(o+-)  with (o+, o-) = implicit_policies(o, o_old, beta)          L934-940, L948
        w+-  = max(sg(mean |x0+- - x0|), 1e-5)   (float64)                            L941-946, L949-954
        L+-  = mean((x0+- - x0)^2) / w+-                                              L947, L955-957
        loss = mean_b[A_max (r L+ / beta + (1 - r) L- / beta)]                        L959-960
               + kl_beta mean_b mean((o - o_ref)^2)                                   L966-970

    The caller divides by the accumulated micro-steps x trained steps (L801, L983). Returns the loss (float64)
    and detached metrics.
    """
    if out.shape != x0.shape or out_old.shape != x0.shape or (out_ref is not None and out_ref.shape != x0.shape):
        raise ValueError(f"outputs must have x0's shape {tuple(x0.shape)}")
    if advantages.shape != x0.shape[:1]:
        raise ValueError(f"advantages must have shape ({x0.shape[0]},), got {tuple(advantages.shape)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    target = x0.detach().double()
    adv = advantages.detach().double().clamp(-adv_clip_max, adv_clip_max)
    r = (adv / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)
    pos, neg = implicit_policies(out, out_old, beta)
    losses = []
    for o in (pos, neg):
        err = to_x0(o).double() - target
        with torch.no_grad():
            weight = _per_sample_mean(err.abs()).clamp(min=WEIGHT_MIN)
        # The reference squares in the model's dtype and divides by the float64 weight (the quotient is float64);
        # squaring in float64 here is the same value, slightly more exact.
        losses.append(_per_sample_mean(err**2) / weight)
    pos_loss, neg_loss = losses
    unweighted = r * pos_loss / beta + (1.0 - r) * neg_loss / beta
    policy_loss = (unweighted * adv_clip_max).mean()
    info = {
        "policy_loss": policy_loss.detach(),
        "unweighted_policy_loss": unweighted.mean().detach(),
        "old_deviate": _per_sample_mean((out.detach().double() - out_old.detach().double()) ** 2).mean(),  # L932
    }
    loss = policy_loss
    if out_ref is not None:
        kl = _per_sample_mean((out.double() - out_ref.detach().double()) ** 2).mean()
        info["kl"] = kl.detach()
        loss = loss + kl_beta * kl
    return loss, info


def _guidance_is_cfg(name: str) -> bool | None:
    """Whether ``sample.guidance_scale`` is classifier-free guidance for model ``name`` (UNet, SD3) rather than
    FLUX's guidance embedding; None when that cannot be told before the model loads."""
    from rlbench.diffusion.sampler import model_family, pipeline_kind

    kind = pipeline_kind(name)
    if kind is not None:
        return kind != "flux"
    family = model_family(name)
    if family == "flow":  # a registered flow model: the aliases say which in their names (flux.1-dev, ...)
        return "flux" not in name.lower()
    return True if family == "ddim" else None


# -- the algorithm ---------------------------------------------------------------------------------------

class NFT(Algorithm):
    """DiffusionNFT: reward-weighted positive/negative implicit policies regressed on the forward process."""

    name = "nft"
    trains_on_trajectory = False  # the loss needs only the final samples (batch.final)

    @dataclass
    class Options:
        beta: float = option(BETA, "NFT beta: the implicit policies' step from the old policy, o+ = beta o + "
                                   "(1 - beta) o_old (DiffusionNFT config/nft.py: 1.0; 0.1 for OCR, multi-reward)")
        kl_beta: float = option(KL_BETA, "Weight of the KL penalty mean((o - o_ref)^2) to the base model "
                                         "(config/nft.py train.beta: 1e-4); 0 = none, no reference forward")
        adv_clip_max: float = option(ADV_CLIP_MAX, "Advantages are clipped to [-adv_clip_max, adv_clip_max] and "
                                                   "mapped to reward weights in [0, 1] (config/base.py: 5)")
        decay_type: int = option(DECAY_TYPE, "Old-policy decay schedule over optimizer steps s: 0 = none (old = "
                                             "current after each epoch); 1 = min(0.001 s, 0.5); 2 = 0 until s = 75, "
                                             "then min(0.0075 (s - 75), 0.999) (config/nft.py: 1; 2 for OCR)")
        global_std: bool = option(True, "Divide by the std of all the epoch's rewards (DiffusionNFT's "
                                        "sample.global_std) instead of each group's own")
        guided: bool = option(False, "Allow classifier-free guidance (sample.guidance_scale != 1, FLUX's "
                                     "true_cfg_scale > 1): NFT on the guided policy, every forward guided "
                                     "(needs train.cfg = true). DiffusionNFT is CFG-free")

        def __post_init__(self) -> None:
            if not self.beta > 0:
                raise ValueError(f"beta must be > 0 (the loss divides by it), got {self.beta}")
            if not self.kl_beta >= 0:
                raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta}")
            if not self.adv_clip_max > 0:
                raise ValueError(f"adv_clip_max must be > 0, got {self.adv_clip_max}")
            if self.decay_type not in (0, 1, 2):
                raise ValueError(f"decay_type must be 0, 1 or 2, got {self.decay_type}")

    def __init__(self, options, config) -> None:
        super().__init__(options, config)
        self.old: dict[str, torch.Tensor] | None = None  # the old policy's trainable tensors, by parameter name
        self.global_step = 0  # optimizer steps taken in the run (the decay's clock)
        self._expect_old = False  # a loaded state_dict says the checkpoint holds the old weights
        self.zero_std_ratio: float | None = None

    # -- configuration ---------------------------------------------------------------------------------
    @classmethod
    def validate(cls, config, options) -> None:
        # Any sampler: the loss needs only the final samples (DiffusionNFT samples deterministically).
        k = config.sample.images_per_prompt
        if k < 2:
            raise ConfigError(
                f"nft normalises rewards within groups of images of one prompt: set sample.images_per_prompt >= 2 "
                f"(got {k}; DiffusionNFT uses 24).")
        s = config.sample
        if options.guided:
            if not config.train.cfg:
                raise ConfigError("nft with algorithm.guided = true trains the guided policy that samples: set "
                                  "train.cfg = true (or algorithm.guided = false with sample.guidance_scale = 1).")
            return
        if s.true_cfg_scale != 1.0:
            raise ConfigError(
                f"nft is CFG-free (DiffusionNFT samples and trains without guidance): set sample.true_cfg_scale = 1 "
                f"(got {s.true_cfg_scale}), or algorithm.guided = true to train the guided policy.")
        if s.guidance_scale != 1.0 and _guidance_is_cfg(config.model.name) is not False:
            raise ConfigError(
                f"nft is CFG-free (DiffusionNFT config/nft.py: sample.guidance_scale = 1.0): set "
                f"sample.guidance_scale = 1 (got {s.guidance_scale}), or algorithm.guided = true to train the "
                "guided policy (every forward guided, twice the compute).")

    def uses_reference(self) -> bool:
        return self.options.kl_beta > 0

    def advantages(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        adv, flat = group_normalize(prompts, rewards, self.options.global_std)
        self.zero_std_ratio = flat_group_fraction(prompts, flat)
        return adv

    def part_advantages(self, name: str, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return group_normalize(prompts, rewards, self.options.global_std)[0]

    # -- the old policy ------------------------------------------------------------------------------------
    @staticmethod
    def _trainables(policy: Any) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in policy.denoiser.named_parameters() if p.requires_grad}

    def _old_for(self, policy: Any) -> dict[str, torch.Tensor]:
        """The old tensors on the parameters' devices and dtypes; a copy of the current ones if there are none."""
        params = self._trainables(policy)
        if self.old is None:
            if self._expect_old:
                raise RunDirError("the nft checkpoint's old-policy weights were not loaded (NFT.load_tensors), so "
                                  "the run cannot continue exactly.")
            self.old = {n: p.detach().clone() for n, p in params.items()}
            return self.old
        if set(self.old) != set(params):
            missing, extra = sorted(set(params) - set(self.old)), sorted(set(self.old) - set(params))
            raise ConfigError(f"nft's old-policy weights do not match the model's trainable parameters (missing "
                              f"{missing[:3]}, unexpected {extra[:3]}); were they saved with another model?")
        for n, p in params.items():
            t = self.old[n]
            if t.shape != p.shape:
                raise ConfigError(f"nft's old-policy weight {n} has shape {tuple(t.shape)}, the model's "
                                  f"{tuple(p.shape)}.")
            if t.device != p.device or t.dtype != p.dtype:
                self.old[n] = t.to(device=p.device, dtype=p.dtype)
        return self.old

    @contextlib.contextmanager
    def _old_active(self, policy: Any) -> Iterator[None]:
        """Within the block the policy computes the old policy (swapping ``param.data``, as BaseWeights does)."""
        old = self._old_for(policy)
        pairs = [(p, old[n]) for n, p in self._trainables(policy).items()]
        for p, t in pairs:
            p.data, t.data = t.data, p.data
        try:
            yield
        finally:
            for p, t in pairs:
                p.data, t.data = t.data, p.data

    @contextlib.contextmanager
    def sampling_weights(self, policy: Any) -> Iterator[None]:
        """For the trainer around an epoch's sampling: DiffusionNFT samples with the old policy (L640-659).
        Before the first update there is no old policy yet (it equals the current weights)."""
        if self.old is None and not self._expect_old:
            yield
            return
        with self._old_active(policy):
            yield

    def _blend_old(self, policy: Any, decay: float) -> None:
        """``old <- decay old + (1 - decay) theta`` (train_nft_sd3.py L1034-1039)."""
        old = self._old_for(policy)
        with torch.no_grad():
            for n, p in self._trainables(policy).items():
                old[n].copy_(old[n] * decay + p.detach() * (1.0 - decay))

    # -- the update ----------------------------------------------------------------------------------
    def update(self, policy, batch: TrainBatch, ctx: UpdateContext) -> dict[str, float | None]:
        cfg, opt = self.config, self.options
        if opt.kl_beta > 0 and ctx.reference is None:
            raise RuntimeError("nft with kl_beta > 0 needs the base model: UpdateContext.reference is None")
        if batch.final is None:
            raise RuntimeError("nft trains on the final samples: TrainBatch.final is None")
        guidance = float(cfg.sample.guidance_scale)  # 1 unless guided or FLUX's embedding (validate)
        if not opt.guided and guidance != 1.0 and getattr(policy, "kind", None) != "flux":
            raise ConfigError(f"nft is CFG-free: {policy.name} guides with sample.guidance_scale = {guidance}; set "
                              "it to 1, or algorithm.guided = true.")
        self._old_for(policy)  # the old policy as the epoch starts (a copy of the weights at the first update)
        x0_all = batch.final
        device = x0_all.device
        with policy.keeping_schedule():
            keys = torch.as_tensor(policy.schedule(cfg.sample.num_steps)).to(device)  # (T,) or (T, 3)
        window = max(1, int(len(keys) * cfg.train.timestep_window))
        n_train = max(1, int(window * cfg.train.timestep_fraction))  # reference: int(10 * 0.99) = 9 (L569)
        mb, acc = cfg.train.batch_size, cfg.train.gradient_accumulation_steps
        sums: dict[str, float] = {"loss": 0.0}
        count = 0
        # DDPO's schedule (shuffle L807, a step order per sample L810-816); each call trains k steps of every
        # sample, and its weight k / (group n_train) gives the reference's sum over steps / (grad_accum
        # num_train_timesteps) (L801, L983).
        for idx, steps, k, weight, sync in trained_steps(torch.arange(len(batch)), window, n_train, mb, acc,
                                                         steps_per_forward(cfg, policy.device, policy.family),
                                                         cfg.train.num_inner_epochs, ctx.generator):
            dev_idx = idx.to(device)
            key = keys[steps.to(device).reshape(-1)]
            x0 = x0_all[dev_idx].repeat_interleave(k, dim=0)
            noise = torch.randn(x0.shape, generator=ctx.generator).to(device)  # fresh eps (L868)
            x_t = policy.noised(x0, noise, key)
            cond = batch.prompt_embeds[idx.to(batch.prompt_embeds.device)].repeat_interleave(k, dim=0)
            adv = batch.advantages[idx.to(batch.advantages.device)].repeat_interleave(k)
            loss, info = self._step(policy, x0, x_t, key, cond, batch.neg_embeds, adv, guidance, ctx)
            ctx.backward(loss * weight, sync=sync)
            sums["loss"] += float(loss.detach()) * k
            for name, value in info.items():
                sums[name] = sums.get(name, 0.0) + float(value) * k
            count += k
        metrics: dict[str, float | None] = {key: v / max(count, 1) for key, v in sums.items()}
        # The old policy moves after the epoch (L1034-1039), its decay read at the run's optimizer steps (L1035).
        self.global_step += ctx.steps
        decay = old_decay(self.global_step, opt.decay_type)
        self._blend_old(policy, decay)
        metrics.update({"approx_kl": None, "clipfrac": None, "old_decay": decay,
                        "zero_std_ratio": self.zero_std_ratio})
        return metrics

    def _step(self, policy, x0, x_t, key, cond, neg, adv, guidance: float, ctx: UpdateContext):
        """One forward's loss: the old and reference outputs first, without a graph, so their weight swaps are
        undone before the current output's graph is built."""
        with torch.no_grad():
            with self._old_active(policy):
                out_old = policy.model_output(x_t, key, cond, neg, guidance)
            out_ref = None
            if self.options.kl_beta > 0:
                with ctx.reference.active():
                    out_ref = policy.model_output(x_t, key, cond, neg, guidance)
        out = policy.model_output(x_t, key, cond, neg, guidance)
        return nft_loss(x0, out, out_old, adv, lambda o: policy.predict_x0(o, key, x_t),
                        beta=self.options.beta, adv_clip_max=self.options.adv_clip_max, out_ref=out_ref,
                        kl_beta=self.options.kl_beta)

    # -- state across epochs -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"global_step": self.global_step, "old_weights": self.old is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step = int(state.get("global_step", 0))
        self._expect_old = bool(state.get("old_weights", False))

    def save_tensors(self, folder: Path) -> None:
        """Write the old policy's tensors to ``folder/nft_old_weights.safetensors`` (nothing before the first
        update). For the trainer's checkpoint writer, beside ``trainable.safetensors``."""
        if self.old is None:
            return
        from safetensors.torch import save_file

        save_file({n: t.detach().contiguous().cpu() for n, t in self.old.items()}, str(Path(folder) / OLD_WEIGHTS_FILE))

    def load_tensors(self, folder: Path) -> None:
        """Read :meth:`save_tensors`' file (after :meth:`load_state_dict`); the tensors move to the policy's device
        at their first use."""
        path = Path(folder) / OLD_WEIGHTS_FILE
        if not path.is_file():
            if self._expect_old:
                raise RunDirError(f"{path} is missing: the checkpoint's nft old-policy weights are gone, so the run "
                                  "cannot continue exactly.")
            self.old = None
            return
        from safetensors.torch import load_file

        try:
            self.old = load_file(str(path))
        except Exception as exc:  # SafetensorError on a damaged file
            raise RunDirError(f"{path} cannot be read ({type(exc).__name__}); the checkpoint is damaged.") from exc
        self._expect_old = True
