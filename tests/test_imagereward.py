"""``imagereward``: ImageReward v1.0 on transformers' BLIP port, loaded from the official checkpoint layout.

The real ``ImageReward.pt`` (1.79 GB) cannot be fetched offline, so a tiny checkpoint in the official
format is written by an independent re-implementation of ImageReward's ORIGINAL modules (below: BLIP's
``VisionTransformer``/``Block``/``Attention`` of vit.py, ``med.py``'s ``BertModel`` with cross-attention,
``BLIP_Pretrain``, ImageReward's ``MLP``), with the original attribute names, so ``state_dict()`` has
the official key layout. The reward loads that file through its normal path and must reproduce the
original's ``ImageReward.score`` computation (torchvision ``_transform`` on PIL, one image at a time).
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rlbench.nets.blip import (
    KEY_RULES,
    BlipRewardConfig,
    ImageRewardModel,
    convert_official_state_dict,
    model_to_official_key,
    model_to_official_state_dict,
    official_to_model_key,
)
from rlbench.checker import check_reward
from rlbench.errors import ConfigError, WeightsNotAvailable
from rlbench.nets.preprocess import CLIP_MEAN, CLIP_STD
from rlbench.registry import make_reward
from rlbench.reward import reward_card
from rlbench.rewards.imagereward import ImageReward
from rlbench.testing import TINY_BERT_VOCAB, TINY_BLIP_CONFIG, randomise_, tiny_bert_tokenizer

# Published constants, typed in from ImageReward/ImageReward.py (not imported from the code under test).
IR_MEAN, IR_STD, IR_MAX_LENGTH = 0.16717362830052426, 1.0333394966054072, 35
IR_NORM_MEAN = (0.48145466, 0.4578275, 0.40821073)
IR_NORM_STD = (0.26862954, 0.26130258, 0.27577711)
# huggingface.co/THUDM/ImageReward ImageReward.pt: 1,786,880,927 bytes (the reference: "1.79 GB").
CHECKPOINT_BYTES = 1_786_880_927

VOCAB, TINY = TINY_BERT_VOCAB, TINY_BLIP_CONFIG  # the tiny bert-uncased vocabulary and BLIP sizes

pytestmark = pytest.mark.usefixtures("one_thread")


# -- an independent re-implementation of the ORIGINAL modules (official names = official keys) ----------


class Attention(nn.Module):  # BLIP models/vit.py
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):  # timm
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        n = (c["image_size"] // c["patch_size"]) ** 2
        d = c["vision_hidden"]
        self.patch_embed = PatchEmbed(c["patch_size"], d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, d))
        self.blocks = nn.ModuleList(Block(d, c["vision_heads"], c["vision_intermediate"])
                                    for _ in range(c["vision_layers"]))
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed[:, : x.size(1), :]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class BertEmbeddings(nn.Module):  # BLIP med.py: word + absolute position embeddings, no token types
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["text_hidden"], padding_idx=0)
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], c["text_hidden"])
        self.LayerNorm = nn.LayerNorm(c["text_hidden"], eps=1e-12)
        self.register_buffer("position_ids", torch.arange(c["max_position_embeddings"]).expand((1, -1)))

    def forward(self, ids):
        positions = self.position_ids[:, : ids.shape[1]]
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions))


class BertSelfAttention(nn.Module):
    def __init__(self, c, cross):
        super().__init__()
        d, kv = c["text_hidden"], (c["vision_hidden"] if cross else c["text_hidden"])
        self.h = c["text_heads"]
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(kv, d), nn.Linear(kv, d)

    def split(self, x):
        return x.view(*x.shape[:2], self.h, -1).permute(0, 2, 1, 3)

    def forward(self, x, mask, enc=None):
        src = x if enc is None else enc
        q, k, v = self.split(self.query(x)), self.split(self.key(src)), self.split(self.value(src))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores + mask
        ctx = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(*ctx.shape[:2], -1)


class BertSelfOutput(nn.Module):
    def __init__(self, c, inner):
        super().__init__()
        self.dense = nn.Linear(inner, c["text_hidden"])
        self.LayerNorm = nn.LayerNorm(c["text_hidden"], eps=1e-12)

    def forward(self, h, x):
        return self.LayerNorm(self.dense(h) + x)


class BertAttention(nn.Module):
    def __init__(self, c, cross=False):
        super().__init__()
        self.self, self.output = BertSelfAttention(c, cross), BertSelfOutput(c, c["text_hidden"])

    def forward(self, x, mask, enc=None):
        return self.output(self.self(x, mask, enc), x)


class BertIntermediate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c["text_hidden"], c["text_intermediate"])

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention, self.crossattention = BertAttention(c), BertAttention(c, cross=True)
        self.intermediate, self.output = BertIntermediate(c), BertSelfOutput(c, c["text_intermediate"])

    def forward(self, x, mask, enc, enc_mask):  # mode='multimodal'
        x = self.crossattention(self.attention(x, mask), enc_mask, enc)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c["text_layers"]))


class BertModel(nn.Module):  # add_pooling_layer=False
    def __init__(self, c):
        super().__init__()
        self.embeddings, self.encoder = BertEmbeddings(c), BertEncoder(c)

    def forward(self, ids, attention_mask, encoder_hidden_states, encoder_attention_mask):
        ext = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # get_extended_attention_mask
        enc_ext = (1.0 - encoder_attention_mask[:, None, None, :].float()) * -10000.0
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, ext, encoder_hidden_states, enc_ext)
        return x


class BLIP_Pretrain(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.visual_encoder, self.text_encoder = VisionTransformer(c), BertModel(c)
        self.vision_proj = nn.Linear(c["vision_hidden"], c["projection_dim"])
        self.text_proj = nn.Linear(c["text_hidden"], c["projection_dim"])


class MLP(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(n, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class OriginalImageReward(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.blip, self.mlp = BLIP_Pretrain(c), MLP(c["text_hidden"])


def original_scores(model, tokenizer, images, prompts, size):
    """ImageReward.score, one (image, prompt) at a time, on PIL images through torchvision's _transform."""
    from PIL import Image
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    transform = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size), ToTensor(),
                         Normalize(IR_NORM_MEAN, IR_NORM_STD)])
    out = []
    with torch.no_grad():
        for img, prompt in zip(images, prompts):
            pil = Image.fromarray((img * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
            text = tokenizer(prompt, padding="max_length", truncation=True, max_length=IR_MAX_LENGTH,
                             return_tensors="pt")
            image_embeds = model.blip.visual_encoder(transform(pil).unsqueeze(0))
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
            hidden = model.blip.text_encoder(text.input_ids, text.attention_mask, image_embeds, image_atts)
            out.append(float((model.mlp(hidden[:, 0, :].float()) - IR_MEAN) / IR_STD))
    return torch.tensor(out)


def blip_tokenizer(folder):
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny ImageReward.pt in the official layout plus a tiny bert-uncased tokenizer folder."""
    root = tmp_path_factory.mktemp("imagereward")
    tiny_bert_tokenizer(root / "tokenizer")
    original = OriginalImageReward(TINY).eval()
    randomise_(original, seed=0)
    torch.save(original.state_dict(), root / "ImageReward.pt")
    return {"ckpt": root / "ImageReward.pt", "tokenizer": root / "tokenizer", "original": original,
            "tok": blip_tokenizer(root / "tokenizer")}


def make(tiny, **kw) -> ImageReward:
    return ImageReward(weights=str(tiny["ckpt"]), tokenizer=str(tiny["tokenizer"]), config=TINY, **kw)


def inputs(n=5, seed=0, h=48, w=40):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)  # smooth colour fields: resampling is well conditioned
    images = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    pool = ["a photo of a cat", "two red circles left of a blue square", "a green apple on the table",
            "a dog", "the " + "very long " * 30 + "prompt"]
    return images, [pool[i % len(pool)] for i in range(n)]


# -- contract, card, options ---------------------------------------------------------------------------


def test_check_reward_passes(tiny) -> None:
    check_reward(make(tiny))
    r = make_reward("imagereward", weights=str(tiny["ckpt"]), tokenizer=str(tiny["tokenizer"]), config=TINY)
    check_reward(r, batch_size=4, image_size=48)


def test_card() -> None:
    card = reward_card(ImageReward)
    assert card.name == "imagereward" and card.version == "1"
    assert card.higher_is_better and card.deterministic and card.differentiable
    assert "THUDM/ImageReward/ImageReward.pt@5736be03b265" in card.weights and "bert-base-uncased" in card.weights
    assert card.license == "apache-2.0"
    assert "arXiv:2304.05977" in card.paper and "N(0, 1)" in card.score_range
    assert [s.option for s in ImageReward.weights_spec] == ["weights", "tokenizer"]


def test_options_are_validated_and_construction_loads_nothing(tiny) -> None:
    r = ImageReward(weights="/does/not/exist/ImageReward.pt")  # no I/O at construction
    assert r._model is None
    for bad in ({"dtype": "float64"}, {"batch_size": 0}, {"config": {"bogus": 1}},
                {"config": {"vision_hidden": 30}}, {"device": "nodevice"}):
        with pytest.raises(ValueError):
            ImageReward(**bad)
        with pytest.raises(ConfigError):
            make_reward("imagereward", **bad)
    card = reward_card(make(tiny))  # the card names the weights in use
    assert str(tiny["ckpt"]) in card.weights and str(tiny["tokenizer"]) in card.weights


# -- the score: the published formula, computed independently ---------------------------------------


def test_score_equals_the_original_computation(tiny) -> None:
    images, prompts = inputs(n=6, seed=1)
    got = make(tiny)(images, prompts)
    expected = original_scores(tiny["original"], tiny["tok"], images, prompts, TINY["image_size"])
    assert got.scores.dtype == torch.float32 and got.scores.shape == (6,)
    torch.testing.assert_close(got.scores, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.info["raw"], expected * IR_STD + IR_MEAN, atol=1e-5, rtol=1e-5)
    assert expected.std() > 0.05  # the comparison is not trivially satisfied by a constant


def test_scores_depend_on_image_and_prompt(tiny) -> None:
    r = make(tiny)
    images, prompts = inputs(n=4, seed=2)
    base = r(images, prompts).scores
    assert not torch.allclose(base, r(images, prompts[1:] + prompts[:1]).scores, atol=1e-3)
    assert not torch.allclose(base, r(images.flip(-1), prompts).scores, atol=1e-3)


def test_prompts_truncate_at_35_tokens(tiny) -> None:
    r = make(tiny)
    long = "a " + "red circle " * 40
    ids, mask = r.tokenize([long, "a cat"])
    assert ids.shape == mask.shape == (2, IR_MAX_LENGTH)
    assert ids[0, 0] == 2 and ids[0, -1] == 3 and mask[0].all()  # [CLS] ... [SEP], no room to pad
    assert mask[1].tolist() == [1, 1, 1, 1] + [0] * 31 and ids[1, 4:].eq(0).all()  # padded with [PAD]
    images, _ = inputs(n=2, seed=3)
    a = r(images, [long, long]).scores
    b = r(images, [long + " blue square dog", long + " apple"]).scores  # only words past token 34 differ
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_numerics_settings_of_the_port(tiny) -> None:
    """What a tiny random model may not resolve: LayerNorm eps (vit.py 1e-6, med_config 1e-12), erf GELU."""
    model = make(tiny)._load()[0]
    assert {m.eps for m in model.vision.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}
    assert {m.eps for m in model.text.modules() if isinstance(m, nn.LayerNorm)} == {1e-12}
    x = torch.linspace(-4, 4, 101)
    for act in (model.vision.encoder.layers[0].mlp.activation_fn,
                model.text.encoder.layer[0].intermediate.intermediate_act_fn):
        torch.testing.assert_close(act(x), F.gelu(x), atol=0, rtol=0)  # nn.GELU() / "gelu": exact erf form
    assert model.head[0].weight.dtype == torch.float32 and not model.training


def test_blip_special_tokens_are_added(tiny) -> None:
    tok = make(tiny)._load()[1]
    assert len(tok) == len(VOCAB) + 2
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(VOCAB), len(VOCAB) + 1]


def test_wrong_tokenizer_size_is_an_error(tiny, tmp_path) -> None:
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB + ["extra"]) + "\n")
    with pytest.raises(WeightsNotAvailable, match="30524"):
        ImageReward(weights=str(tiny["ckpt"]), tokenizer=str(tmp_path), config=TINY)(*inputs(n=1))


# -- preprocessing ------------------------------------------------------------------------------------


def test_preprocessing_constants_and_exact_transform(tiny) -> None:
    from PIL import Image
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    assert CLIP_MEAN == IR_NORM_MEAN and CLIP_STD == IR_NORM_STD
    assert BlipRewardConfig().image_size == 224 and BlipRewardConfig().patch_size == 16
    r = ImageReward()  # default: 224 px
    transform = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224), ToTensor(),
                         Normalize(IR_NORM_MEAN, IR_NORM_STD)])
    for h, w in ((300, 257), (200, 451), (224, 224)):
        images, _ = inputs(n=2, seed=h, h=h, w=w)
        expected = torch.stack([transform(Image.fromarray(a)) for a in
                                (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()])
        got = r.pixel_values(images)
        assert got.shape == (2, 3, 224, 224)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        soft = r.pixel_values(images, differentiable=True)  # float path: resampling + rounding only
        assert (soft - expected).abs().mean() < 0.02


# -- batching -------------------------------------------------------------------------------------------


def test_batch_size_invariance(tiny) -> None:
    images, prompts = inputs(n=7, seed=4)
    ref = make(tiny, batch_size=32)(images, prompts).scores
    for bs in (1, 3):
        torch.testing.assert_close(make(tiny, batch_size=bs)(images, prompts).scores, ref, atol=1e-5, rtol=1e-5)
    r = make(tiny)
    torch.testing.assert_close(r(images[2:5], prompts[2:5]).scores, ref[2:5], atol=1e-5, rtol=1e-5)


def test_one_forward_per_chunk(tiny) -> None:
    r = make(tiny, batch_size=3)
    images, prompts = inputs(n=7, seed=5)
    r(images, prompts)  # loads
    rows = {"vision": [], "text": []}
    hooks = [getattr(r._model, part).register_forward_pre_hook(
        lambda m, a, kw, part=part: rows[part].append((kw.get("pixel_values") if part == "vision"
                                                       else kw["input_ids"]).shape[0]), with_kwargs=True)
        for part in rows]
    try:
        r(images, prompts)
    finally:
        for h in hooks:
            h.remove()
    assert rows == {"vision": [3, 3, 1], "text": [3, 3, 1]}


# -- differentiability ----------------------------------------------------------------------------------


def test_differentiable_wrt_the_pixels(tiny) -> None:
    r = make(tiny)
    images, prompts = inputs(n=3, seed=6, h=64, w=64)
    x = images.clone().requires_grad_(True)
    scores = r(x, prompts).scores
    assert scores.requires_grad
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    exact = r(images, prompts).scores  # no grad: the exact PIL path
    torch.testing.assert_close(scores.detach(), exact, atol=0.05, rtol=0)
    assert not any(p.requires_grad for p in r._model.parameters())  # only the pixels get gradients


def test_low_precision_dtype(tiny) -> None:
    images, prompts = inputs(n=3, seed=7)
    ref = make(tiny)(images, prompts).scores
    got = make(tiny, dtype="bfloat16")(images, prompts).scores
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=0.1, rtol=0.05)


# -- the key mapping -------------------------------------------------------------------------------------


def _keys_and_shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("sizes", [TINY, {}], ids=["tiny", "vit-l16-bert-base"])
def test_key_mapping_is_a_bijection_onto_the_model(sizes) -> None:
    cfg = BlipRewardConfig.from_options(sizes)
    with torch.device("meta"):  # full size too, without allocating 1.8 GB
        official = _keys_and_shapes(OriginalImageReward({**asdict(cfg)}))
        ours = _keys_and_shapes(ImageRewardModel(cfg))
    forward = {k: official_to_model_key(k) for k in official}
    assert None not in forward.values(), [k for k, v in forward.items() if v is None]
    assert len(set(forward.values())) == len(forward)  # injective
    assert set(forward.values()) == set(ours)  # onto: every model key is produced
    assert all(official[k] == ours[forward[k]] for k in official)  # shapes agree
    backward = {k: model_to_official_key(k) for k in ours}
    assert set(backward.values()) == set(official) and all(backward[forward[k]] == k for k in official)
    assert len(official) == (4 + 12 * cfg.vision_layers + 2) + (5 + 26 * cfg.text_layers) + 4 + 10
    # every rule is used
    assert {src for src, _ in KEY_RULES} <= {_template_of(k) for k in official}


def _template_of(key: str) -> str:
    from rlbench.nets.blip import _FORWARD, KEY_RULES

    for (pattern, _), (src, _) in zip(_FORWARD, KEY_RULES):
        if pattern.fullmatch(key):
            return src
    raise AssertionError(key)


def test_default_config_is_imagereward_v1_and_matches_the_checkpoint_size() -> None:
    cfg = BlipRewardConfig()
    vision = (cfg.image_size, cfg.patch_size, cfg.vision_hidden, cfg.vision_layers, cfg.vision_heads)
    assert vision == (224, 16, 1024, 24, 16) and cfg.vision_intermediate == 4096
    assert (cfg.text_hidden, cfg.text_layers, cfg.text_heads, cfg.text_intermediate) == (768, 12, 12, 3072)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.vision_eps, cfg.text_eps) == (30524, 512, 1e-6, 1e-12)
    with torch.device("meta"):
        model = OriginalImageReward(asdict(cfg))
    n_float = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    assert n_float == 446_665_953
    data = 4 * n_float + 8 * 512  # fp32 weights + the int64 position_ids
    assert data < CHECKPOINT_BYTES < data + 1_000_000  # the rest is the zip/pickle framing of ~625 tensors


def test_round_trip_and_strictness(tiny) -> None:
    state = torch.load(tiny["ckpt"], weights_only=True)
    with torch.device("meta"):
        model = ImageRewardModel(BlipRewardConfig.from_options(TINY))
    converted = convert_official_state_dict(state, model)
    model.load_state_dict(converted, strict=True, assign=True)
    back = model_to_official_state_dict(model)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    # position_ids is a constant buffer: a checkpoint without it still loads (filled with arange)
    no_pos = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    assert torch.equal(convert_official_state_dict(no_pos, model)["text.embeddings.position_ids"],
                       torch.arange(TINY["max_position_embeddings"]).expand(1, -1))
    with pytest.raises(WeightsNotAvailable, match="missing keys: vision.encoder.layers.1.self_attn.qkv.weight"):
        gone = "blip.visual_encoder.blocks.1.attn.qkv.weight"
        convert_official_state_dict({k: v for k, v in state.items() if k != gone}, model)
    with pytest.raises(WeightsNotAvailable, match="unexpected keys: blip.itm_head.weight"):
        convert_official_state_dict({**state, "blip.itm_head.weight": torch.zeros(2, 32)}, model)
    with pytest.raises(WeightsNotAvailable, match="unexpected keys: module.mlp.layers.0.weight"):
        convert_official_state_dict({**state, "module.mlp.layers.0.weight": torch.zeros(1)}, model)
    with pytest.raises(WeightsNotAvailable, match="wrong shapes"):
        convert_official_state_dict({**state, "mlp.layers.7.weight": torch.zeros(1, 8)}, model)


def test_bad_checkpoints_fail_on_first_call(tiny, tmp_path) -> None:
    state = torch.load(tiny["ckpt"], weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("mlp.")}, tmp_path / "partial.pt")
    with pytest.raises(WeightsNotAvailable, match="missing keys: head"):
        ImageReward(weights=str(tmp_path / "partial.pt"), tokenizer=str(tiny["tokenizer"]), config=TINY)(*inputs(n=1))
    torch.save({"model": state, "epoch": 3}, tmp_path / "wrapped.pt")
    with pytest.raises(WeightsNotAvailable, match="flat state dict"):
        ImageReward(weights=str(tmp_path / "wrapped.pt"), tokenizer=str(tiny["tokenizer"]), config=TINY)(*inputs(n=1))
    with pytest.raises(WeightsNotAvailable, match="wrong shapes"):  # the tiny file under the default config
        ImageReward(weights=str(tiny["ckpt"]), tokenizer=str(tiny["tokenizer"]),
                    config={**TINY, "text_intermediate": 48})(*inputs(n=1))


# -- missing weights --------------------------------------------------------------------------------------


def test_missing_weights_name_the_download_command(tmp_path, monkeypatch, tiny) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HOME", str(tmp_path))
    images, prompts = inputs(n=1)
    r = make_reward("imagereward")  # constructs offline
    with pytest.raises(WeightsNotAvailable, match=r"rlbench rewards download imagereward.*--reward-opt weights=PATH"):
        r(images, prompts)
    with pytest.raises(WeightsNotAvailable, match=r"rlbench rewards download imagereward.*--reward-opt tokenizer=PATH"):
        ImageReward(weights=str(tiny["ckpt"]), config=TINY)(images, prompts)
    with pytest.raises(WeightsNotAvailable, match="neither an existing local path nor a hub id"):
        ImageReward(weights="/no/such/ImageReward.pt")(images, prompts)


def test_scores_of_uint8_derived_images(tiny) -> None:
    """Scores come back on the images' device as float32."""
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8))
    x = images.permute(0, 3, 1, 2).float() / 255
    out = make(tiny)(x, ["a cat", "a dog"])
    assert out.scores.device == x.device and out.scores.dtype == torch.float32
