"""ImageReward v1.0's network on current libraries, and the explicit key mapping of its official checkpoint.

ImageReward (Xu et al. 2023) is BLIP's ViT-L/16 image encoder at 224 px, BLIP's "med" BERT-base text
encoder with cross-attention to the image tokens, and an MLP on the text encoder's CLS feature
(ImageReward/ImageReward.py ``ImageReward``, ``BLIP_Pretrain(image_size=224, vit='large')``). The
pip package ``image-reward`` cannot be installed next to current timm/transformers (its pins and its
``med.py`` imports), so the same network is built here from transformers' own BLIP port:

* ``BlipVisionModel`` is BLIP's ``VisionTransformer`` (pre-norm blocks, LayerNorm eps 1e-6, exact-erf
  GELU, one fused ``qkv`` Linear laid out as ``(3, heads, head_dim)`` — the same layout, so the fused
  weight maps one to one; the final ``norm`` is ``post_layernorm``);
* ``BlipTextModel`` (``add_pooling_layer=False``, called with ``is_decoder=False``) is BLIP's
  ``med.BertModel`` in ``mode='multimodal'``: word + position embeddings (no token types),
  bidirectional self-attention, then cross-attention to the image tokens in every layer. Its
  ``position_ids`` buffer is made persistent again, as in ``med.py``, so the checkpoint's copy loads;
* the head is ImageReward's ``MLP``: ``768 -> 1024 -> 128 -> 64 -> 16 -> 1`` linears with dropouts
  0.2/0.2/0.1 and no activations (the ``nn.ReLU()`` lines are commented out upstream).

``ImageReward.pt`` is a flat state dict of ``ImageReward`` (keys ``blip.visual_encoder.*``,
``blip.text_encoder.*``, ``blip.vision_proj.*``, ``blip.text_proj.*``, ``mlp.layers.*``). It is loaded
through :data:`KEY_RULES`, an explicit two-way renaming: every official key maps to exactly one key of
:class:`ImageRewardModel` and back, and the load is strict (a missing, unexpected or mis-shaped key
raises). BLIP's contrastive projections ``vision_proj``/``text_proj`` do not enter the score; they are
kept as modules so that the whole checkpoint loads and the mapping stays a bijection.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlbench.errors import WeightsNotAvailable

# ImageReward/ImageReward.py: ``self.mean``, ``self.std`` (score = (mlp(cls) - MEAN) / STD).
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
# ImageReward/ImageReward.py ``score``: tokenizer(prompt, padding='max_length', truncation=True, max_length=35).
MAX_LENGTH = 35
# ImageReward/ImageReward.py ``MLP``: hidden sizes and dropouts of the head (no activations).
HEAD_SIZES = (1024, 128, 64, 16, 1)
HEAD_DROPOUTS = (0.2, 0.2, 0.1)


@dataclass(frozen=True)
class BlipRewardConfig:
    """Sizes of the network. Defaults are ImageReward v1.0: ViT-L/16 @ 224 + BERT-base (med_config.json).

    Sources: blip.py ``create_vit('large')`` (width 1024, depth 24, heads 16, patch 16, mlp_ratio 4);
    ``med_config.json`` (hidden 768, 12 layers, 12 heads, intermediate 3072, vocab 30524 = bert-base-uncased's
    30522 + ``[DEC]`` + ``[ENC]``, 512 positions, LayerNorm eps 1e-12, gelu); ``BLIP_Pretrain(embed_dim=256)``.
    Tests override sizes to build a tiny model of the same structure.
    """

    image_size: int = 224
    patch_size: int = 16
    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_intermediate: int = 4096
    vision_eps: float = 1e-6  # BLIP vit.py: partial(nn.LayerNorm, eps=1e-6)
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    text_eps: float = 1e-12  # med_config.json layer_norm_eps
    vocab_size: int = 30524
    max_position_embeddings: int = 512
    projection_dim: int = 256  # BLIP_Pretrain embed_dim (vision_proj / text_proj, unused by the score)

    @classmethod
    def from_options(cls, overrides: Mapping[str, Any] | BlipRewardConfig | None) -> BlipRewardConfig:
        """The default config with ``overrides`` (a dict of field names) applied and validated."""
        if overrides is None:
            return cls()
        if isinstance(overrides, BlipRewardConfig):
            cfg = overrides
        else:
            if not isinstance(overrides, Mapping):
                raise ValueError(f"config must be a dict of size overrides, got {type(overrides).__name__}")
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise ValueError(f"config has no field(s) {unknown}; its fields are {sorted(known)}")
            cfg = cls(**{**asdict(cls()), **dict(overrides)})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_eps"):
                if not (isinstance(value, float) and value > 0):
                    raise ValueError(f"config.{f.name} must be a positive float, got {value!r}")
            elif not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"config.{f.name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"config.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for hidden, heads, what in ((self.vision_hidden, self.vision_heads, "vision"),
                                    (self.text_hidden, self.text_heads, "text")):
            if hidden % heads:
                raise ValueError(f"config.{what}_hidden {hidden} is not a multiple of {what}_heads {heads}")
        if self.max_position_embeddings < MAX_LENGTH:
            raise ValueError(f"config.max_position_embeddings must be >= {MAX_LENGTH} (the prompt length)")


class ImageRewardModel(nn.Module):
    """ImageReward's network: ``forward(pixels, input_ids, attention_mask)`` gives the raw MLP output (B,)."""

    def __init__(self, cfg: BlipRewardConfig) -> None:
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        self.cfg = cfg
        self.vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
            num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
            image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="gelu",
            layer_norm_eps=cfg.vision_eps, attention_dropout=0.0,
        ))
        # is_decoder=True only makes BlipTextLayer build its cross-attention (med.py builds it from
        # add_cross_attention); forward passes is_decoder=False: bidirectional, as med's mode='multimodal'.
        self.text = BlipTextModel(BlipTextConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden, encoder_hidden_size=cfg.vision_hidden,
            intermediate_size=cfg.text_intermediate, num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.max_position_embeddings,
            hidden_act="gelu", layer_norm_eps=cfg.text_eps, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, pad_token_id=0, is_decoder=True, use_cache=False,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, sep_token_id=None,  # generation only
        ), add_pooling_layer=False)
        emb = self.text.embeddings
        emb.register_buffer("position_ids", emb.position_ids, persistent=True)  # persistent in med.py
        self.vision_proj = nn.Linear(cfg.vision_hidden, cfg.projection_dim)
        self.text_proj = nn.Linear(cfg.text_hidden, cfg.projection_dim)
        sizes = (cfg.text_hidden, *HEAD_SIZES)
        layers: list[nn.Module] = []
        for k in range(len(HEAD_SIZES)):
            layers.append(nn.Linear(sizes[k], sizes[k + 1]))
            if k < len(HEAD_DROPOUTS):
                layers.append(nn.Dropout(HEAD_DROPOUTS[k]))
        self.head = nn.Sequential(*layers)  # Linear indices 0, 2, 4, 6, 7 as ImageReward's mlp.layers

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        # No encoder mask: every image token is attended to (ImageReward passes image_atts = ones).
        text = self.text(input_ids=input_ids, attention_mask=attention_mask,
                         encoder_hidden_states=image_embeds, is_decoder=False)
        cls = text.last_hidden_state[:, 0, :].float()  # ImageReward: last_hidden_state[:,0,:].float()
        return self.head(cls.to(self.head[0].weight.dtype)).squeeze(-1).float()


# -- the official checkpoint's key layout <-> ImageRewardModel ---------------------------------------

# (official key template, model key template); {i}: a layer index, {p}: weight|bias, {rest}: any suffix.
KEY_RULES: tuple[tuple[str, str], ...] = (
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.{p}", "vision.embeddings.patch_embedding.{p}"),
    ("blip.visual_encoder.blocks.{i}.norm1.{p}", "vision.encoder.layers.{i}.layer_norm1.{p}"),
    ("blip.visual_encoder.blocks.{i}.attn.qkv.{p}", "vision.encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blip.visual_encoder.blocks.{i}.attn.proj.{p}", "vision.encoder.layers.{i}.self_attn.projection.{p}"),
    ("blip.visual_encoder.blocks.{i}.norm2.{p}", "vision.encoder.layers.{i}.layer_norm2.{p}"),
    ("blip.visual_encoder.blocks.{i}.mlp.fc1.{p}", "vision.encoder.layers.{i}.mlp.fc1.{p}"),
    ("blip.visual_encoder.blocks.{i}.mlp.fc2.{p}", "vision.encoder.layers.{i}.mlp.fc2.{p}"),
    ("blip.visual_encoder.norm.{p}", "vision.post_layernorm.{p}"),
    # transformers' BlipTextModel is a name-for-name port of BLIP's med.BertModel (embeddings.*,
    # encoder.layer.N.{attention,crossattention}.{self.{query,key,value},output.{dense,LayerNorm}}, ...).
    ("blip.text_encoder.{rest}", "text.{rest}"),
    ("blip.vision_proj.{p}", "vision_proj.{p}"),
    ("blip.text_proj.{p}", "text_proj.{p}"),
    ("mlp.layers.{i}.{p}", "head.{i}.{p}"),
)
_FIELDS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "rest": r"(?P<rest>.+)"}


def _pattern(template: str) -> re.Pattern:
    out = re.escape(template)
    for name, group in _FIELDS.items():
        out = out.replace(re.escape("{" + name + "}"), group)
    return re.compile(out)


_FORWARD = tuple((_pattern(src), dst) for src, dst in KEY_RULES)
_BACKWARD = tuple((_pattern(dst), src) for src, dst in KEY_RULES)


def _rename(key: str, rules) -> str | None:
    for pattern, target in rules:
        m = pattern.fullmatch(key)
        if m:
            return target.format(**m.groupdict())
    return None


def official_to_model_key(key: str) -> str | None:
    """The :class:`ImageRewardModel` key of an ``ImageReward.pt`` key (None: no rule matches)."""
    return _rename(key, _FORWARD)


def model_to_official_key(key: str) -> str | None:
    """The ``ImageReward.pt`` key of an :class:`ImageRewardModel` key (None: no rule matches)."""
    return _rename(key, _BACKWARD)


def _mismatch(path: Any, what: str, keys) -> WeightsNotAvailable:
    keys = sorted(keys)
    shown = ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
    return WeightsNotAvailable(
        f"{path} is not an ImageReward v1.0 checkpoint of this configuration: {what}: {shown}. Pass the "
        "official ImageReward.pt (THUDM/ImageReward), or the matching config."
    )


def convert_official_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module, *, source: Any = "checkpoint"
                                ) -> dict[str, torch.Tensor]:
    """Rename an official state dict to ``model``'s keys; raise on any unknown, missing or mis-shaped key."""
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        new = official_to_model_key(key)
        if new is None or new not in expected:
            unknown.append(key)
            continue
        if new in out:
            raise _mismatch(source, "two keys map to the same parameter", [key, new])
        out[new] = value
    if unknown:
        raise _mismatch(source, "unexpected keys", unknown)
    emb = "text.embeddings.position_ids"
    if emb in expected and emb not in out:  # a constant arange buffer: tolerated if a re-save dropped it
        out[emb] = torch.arange(expected[emb].shape[-1]).expand(1, -1)
    missing = set(expected) - set(out)
    if missing:
        raise _mismatch(source, "missing keys", missing)
    bad = [f"{k} {tuple(out[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if out[k].shape != v.shape]
    if bad:
        raise _mismatch(source, "wrong shapes (checkpoint != model)", bad)
    return out


def model_to_official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict under the official key names (what ``torch.save`` of ImageReward would write)."""
    out = {}
    for key, value in model.state_dict().items():
        old = model_to_official_key(key)
        if old is None:
            raise KeyError(f"no official key for model key {key}")
        out[old] = value
    return out


def load_official(path: str | Path, cfg: BlipRewardConfig) -> ImageRewardModel:
    """Build :class:`ImageRewardModel` from an ``ImageReward.pt`` file (or a folder holding one), strictly."""
    path = Path(path)
    if path.is_dir():
        path = path / "ImageReward.pt"
    if not path.is_file():
        raise WeightsNotAvailable(f"ImageReward checkpoint not found: {path} (expected the file ImageReward.pt).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors of every kind: not a plain state dict
        raise WeightsNotAvailable(
            f"{path} could not be read as a weights-only state dict ({type(exc).__name__}: {exc}); pass the "
            "official ImageReward.pt."
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsNotAvailable(f"{path} is not a flat state dict of tensors (as ImageReward.pt is).")
    with torch.device("meta"):  # no random init of ~450M parameters: the checkpoint's tensors are assigned
        model = ImageRewardModel(cfg)
    model.load_state_dict(convert_official_state_dict(state, model, source=path), strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # every tensor must come from the checkpoint
        raise RuntimeError(f"ImageReward model tensors not loaded: {leftover}")
    return model.eval().requires_grad_(False)
