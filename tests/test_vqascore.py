"""``vqascore`` (VQAScore on Qwen2.5-VL) and the Qwen pieces of rlbench.nets.vlm, on a tiny random Qwen2.5-VL.

The model is the REAL ``Qwen2_5_VLForConditionalGeneration`` with its ``Qwen2_5_VLProcessor`` at toy size, saved in
the hub layout by :func:`rlbench.testing.write_tiny_qwen2_5_vl`; the reference computations below go through
transformers directly, one image at a time (no padding), as t2v_metrics does.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_weights_missing_offline
from rlbench.checker import check_reward
from rlbench.errors import ConfigError, InputError
from rlbench.nets.vlm import qwen_fetch_resize, qwen_smart_resize
from rlbench.registry import make_reward
from rlbench.rewards.vqascore import TEMPLATES, VQAScore, answer_token_id
from rlbench.testing import smooth_images, tiny_clip_tokenizer, tiny_qwen_tokenizer, tiny_reward, write_tiny_qwen2_5_vl

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a cat", "two red circles left of a blue square", "a " + "very long " * 30 + "prompt"]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen") / "qwen2.5-vl-tiny", seed=0)


def reference_p_yes(folder, image: torch.Tensor, question: str, penalty: float = 1.0) -> float:
    """P("Yes") by hand: PIL resize to qwen_vl_utils' size, the processor's chat template, one forward, softmax."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, RepetitionPenaltyLogitsProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
    arr = (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    pil = Image.fromarray(arr)
    h, w = arr.shape[:2]
    # qwen_vl_utils smart_resize by hand for these sizes: sides rounded to multiples of 28.
    pil = pil.resize((round(w / 28) * 28, round(h / 28) * 28), Image.Resampling.BICUBIC)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[pil], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, pil.height // 14, pil.width // 14]]  # the processor kept the size
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1].float()
    if penalty != 1.0:
        logits = RepetitionPenaltyLogitsProcessor(penalty)(inputs["input_ids"], logits)
    yes = processor.tokenizer.encode("Yes")[0]  # t2v_metrics qwen2vl_model.py: tokenizer.encode(answer)[0]
    return float(logits.softmax(-1)[0, yes])


# -- card, templates, options ----------------------------------------------------------------------------


def test_card_templates_and_version_record_template_and_backbone() -> None:
    card = make_reward("vqascore").card  # construction loads nothing
    assert card.name == "vqascore" and card.deterministic and not card.differentiable and card.higher_is_better
    assert card.weights == "Qwen/Qwen2.5-VL-7B-Instruct" and card.license == "Apache-2.0"
    assert card.version == "1+t2v-metrics-3.0-qwen2vl+Qwen/Qwen2.5-VL-7B-Instruct"
    # t2v_metrics 3.0 qwen2vl_model.py forward(question_template=...); v3.1 qwen2vl_model.py (reference §3.2)
    assert TEMPLATES["t2v-metrics-3.0-qwen2vl"].format("a cat") == 'Does this image show "a cat"?'
    assert (TEMPLATES["t2v-metrics-3.1-qwen2vl"].format("a cat")
            == 'Does this figure show "a cat"? Please answer Yes or No.')
    v31 = make_reward("vqascore", template="t2v-metrics-3.1-qwen2vl").card.version
    assert v31 == "1+t2v-metrics-3.1-qwen2vl+Qwen/Qwen2.5-VL-7B-Instruct"
    custom = make_reward("vqascore", template='Is "{}" in this picture?')
    assert custom.card.version.startswith("1+custom-") and custom.card.version not in (card.version, v31)
    assert custom.question("a {dog}") == 'Is "a {dog}" in this picture?'  # braces in prompts are left alone
    other = make_reward("vqascore", weights="Qwen/Qwen2.5-VL-3B-Instruct").card
    assert other.version == "1+t2v-metrics-3.0-qwen2vl+Qwen/Qwen2.5-VL-3B-Instruct"
    assert other.weights == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert "repetition-penalty-checkpoint" in make_reward("vqascore", repetition_penalty="checkpoint").card.version


@pytest.mark.parametrize("options", [dict(template="Does this image show the prompt?"), dict(template="{} {}"),
                                     dict(template="t2v-metrics-9"), dict(batch_size=0), dict(dtype="int8"),
                                     dict(repetition_penalty=0), dict(repetition_penalty="yes"),
                                     dict(min_pixels=0), dict(min_pixels=10_000, max_pixels=5_000)])
def test_bad_options_are_config_errors(options) -> None:
    with pytest.raises(ConfigError):
        make_reward("vqascore", **options)


def test_yes_must_be_a_single_token() -> None:
    qwen = tiny_qwen_tokenizer()
    assert answer_token_id(qwen, "Yes", "tiny") == qwen.convert_tokens_to_ids("Yes")
    with pytest.raises(ConfigError, match="encodes 'Yes' as 3 tokens"):
        answer_token_id(tiny_clip_tokenizer(), "Yes", "a byte-level CLIP tokenizer without merges")


# -- qwen_vl_utils' resize -------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw, expected", [
    ((64, 64), (56, 56)),  # rounded to multiples of 28
    ((512, 512), (504, 504)),
    ((1024, 768), (1036, 756)),
    ((10, 10), (56, 56)),  # up to min_pixels 3136: beta = 5.6, ceil(56 / 28) * 28
    ((6000, 4000), (4368, 2912)),  # down to max_pixels 12845056: beta 1.36691, floor(4389.5 / 28) * 28, ...
])
def test_qwen_smart_resize_matches_qwen_vl_utils(hw, expected) -> None:
    assert qwen_smart_resize(*hw) == expected


def test_qwen_fetch_resize_uses_pil_bicubic_and_rejects_extreme_ratios() -> None:
    img = Image.fromarray((np.random.default_rng(0).random((60, 90, 3)) * 255).astype(np.uint8))
    out = qwen_fetch_resize()(img)
    assert out.size == (84, 56)
    assert np.array_equal(np.asarray(out), np.asarray(img.resize((84, 56), Image.Resampling.BICUBIC)))
    assert qwen_fetch_resize(max_pixels=28 * 28 * 4)(img).size == (56, 28)
    with pytest.raises(InputError, match="aspect ratio"):
        qwen_smart_resize(10, 2100)


# -- scores on the tiny model ------------------------------------------------------------------------------------


def test_equals_an_independent_forward_and_left_padded_batches_equal_single_images(tiny_qwen) -> None:
    images = smooth_images(3, 64, seed=1)
    reward = make_reward("vqascore", weights=str(tiny_qwen), batch_size=3)
    batched = reward(images, PROMPTS).scores
    assert type(reward.vlm.load()[0]).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert batched.dtype == torch.float32 and batched.shape == (3,)
    expected = [reference_p_yes(tiny_qwen, images[i], f'Does this image show "{p}"?') for i, p in enumerate(PROMPTS)]
    assert torch.allclose(batched, torch.tensor(expected), rtol=1e-4, atol=1e-6)
    assert float(batched.max() - batched.min()) > 1e-3  # the prompts and images matter: a constant would not pass
    singles = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]).scores for i in range(3)])
    assert torch.allclose(batched, singles, rtol=1e-4, atol=1e-6)
    # the batch really was padded: its prompts differ in length by hundreds of tokens
    tokenizer = reward.vlm.load()[1].tokenizer
    lengths = [len(tokenizer.encode(reward.vlm.prompt(reward.question(p)))) for p in PROMPTS]
    assert max(lengths) - min(lengths) > 200


def test_prompt_is_the_chat_template_with_the_image_then_the_question(tiny_qwen) -> None:
    reward = VQAScore(weights=str(tiny_qwen))
    assert reward.vlm.prompt(reward.question("a cat")) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        '<|vision_start|><|image_pad|><|vision_end|>Does this image show "a cat"?<|im_end|>\n<|im_start|>assistant\n')


def test_template_choice_changes_the_question_and_the_score(tiny_qwen) -> None:
    images = smooth_images(2, 64, seed=2)
    v30 = VQAScore(weights=str(tiny_qwen))(images, PROMPTS[:2]).scores
    v31 = VQAScore(weights=str(tiny_qwen), template="t2v-metrics-3.1-qwen2vl")(images, PROMPTS[:2]).scores
    expected = [reference_p_yes(tiny_qwen, images[i], f'Does this figure show "{p}"? Please answer Yes or No.')
                for i, p in enumerate(PROMPTS[:2])]
    assert torch.allclose(v31, torch.tensor(expected), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(v30, v31, rtol=1e-3, atol=0)


def test_repetition_penalty_matches_transformers_and_checkpoint_reads_generation_config(tiny_qwen, tmp_path) -> None:
    images = smooth_images(2, 64, seed=3)
    prompts = PROMPTS[:2]
    plain = VQAScore(weights=str(tiny_qwen))(images, prompts).scores
    penalised = VQAScore(weights=str(tiny_qwen), repetition_penalty=1.5)(images, prompts).scores
    expected = [reference_p_yes(tiny_qwen, images[i], f'Does this image show "{p}"?', penalty=1.5)
                for i, p in enumerate(prompts)]
    assert torch.allclose(penalised, torch.tensor(expected), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(plain, penalised, rtol=1e-3, atol=0)
    # "checkpoint": the value of the checkpoint's generation_config.json, as t2v_metrics' generate() applies it
    copy = shutil.copytree(tiny_qwen, tmp_path / "qwen-rp")
    config = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.5}))
    from_checkpoint = VQAScore(weights=str(copy), repetition_penalty="checkpoint")(images, prompts).scores
    assert torch.allclose(from_checkpoint, penalised, rtol=1e-5, atol=1e-7)
    assert torch.allclose(VQAScore(weights=str(tiny_qwen), repetition_penalty="checkpoint")(images, prompts).scores,
                          plain, rtol=1e-5, atol=1e-7)  # the tiny checkpoint sets none


def test_images_of_any_size(tiny_qwen) -> None:
    reward = VQAScore(weights=str(tiny_qwen), max_pixels=56 * 56)
    for h, w in ((40, 40), (100, 60), (300, 200)):
        image = smooth_images(1, (h, w), seed=4)
        score = float(reward(image, ["a cat"]).scores[0])
        assert 0.0 < score < 1.0


def test_passes_check_reward_through_tiny_reward(tmp_path) -> None:
    reward = tiny_reward("vqascore", tmp_path)
    check_reward(reward)
    assert reward.card.version == "1+t2v-metrics-3.0-qwen2vl+local-qwen2.5-vl-tiny"


def test_missing_weights_name_the_download_command(tmp_path, monkeypatch) -> None:
    assert_weights_missing_offline(monkeypatch, tmp_path, "vqascore", "Qwen/Qwen2.5-VL-7B-Instruct",
                                   smooth_images(1, 64), ["a cat"])
