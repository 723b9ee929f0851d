"""``unifiedreward`` (UnifiedReward-qwen-7b's point score / 5): the question, the regex, the re-ask policy.

Fake judges (objects with ``generate(images, questions, *, temperature, seed)``) drive the parse / re-ask / failure
paths; the in-process transformers judge runs on the tiny random Qwen2.5-VL of
:func:`rlbench.testing.write_tiny_qwen2_5_vl`, whose answers never parse.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_weights_missing_offline
from rlbench.checker import check_reward
from rlbench.errors import ConfigError, RewardFailed, RLBenchError
from rlbench.registry import make_reward
from rlbench.rewards.unifiedreward import MAX_NEW_TOKENS, UnifiedReward, parse_score, question
from rlbench.testing import TinyJudgeStandIn, smooth_images, tiny_reward, write_tiny_qwen2_5_vl

pytestmark = pytest.mark.usefixtures("one_thread")

# CodeGoat24/UnifiedReward inference_qwen/image_generation/qwen_point_score_image_generation.py (ed52f98), the
# f-string of the user turn's text, copied verbatim with prompt = "a red cat".
OFFICIAL_QUESTION = (
    'You are given a text caption and a generated image based on that caption. Your task is to evaluate this image '
    'based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with the provided '
    'caption. Consider the accuracy of depicted objects, their relationships, and attributes as described in the '
    'caption.\n2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail '
    'preservation, color accuracy, and overall aesthetic appeal.\nExtract key elements from the provided text '
    'caption, evaluate their presence in the generated image using the format: \'element (type): value\' (where '
    'value=0 means not generated, and value=1 means generated), and assign a score from 1 to 5 after \'Final '
    'Score:\'.\nYour task is provided as follows:\nText Caption: [a red cat]'
)


class ScriptedJudge:
    """Answers from a script: ``greedy[i]`` for image i of the first (greedy) call, then ``sampled(i, attempt)``
    for re-asks (``i`` found by the question); records every call."""

    name = "scripted"

    def __init__(self, greedy, sampled=None):
        self.greedy, self.sampled, self.calls, self.attempts = list(greedy), sampled, [], {}

    def generate(self, images, questions, *, temperature=0.0, seed=None):
        self.calls.append({"n": images.shape[0], "temperature": temperature, "seed": seed,
                           "shape": tuple(images.shape), "questions": list(questions)})
        if not temperature:
            return self.greedy[: len(questions)]
        key = questions[0]
        self.attempts[key] = self.attempts.get(key, 0) + 1
        return [self.sampled(key, self.attempts[key])]


def prompts(n):
    return [f"prompt {i}" for i in range(n)]


# -- constants ------------------------------------------------------------------------------------------------


def test_question_is_the_official_text_verbatim() -> None:
    assert question("a red cat") == OFFICIAL_QUESTION
    assert question("{x}") .endswith("Text Caption: [{x}]")  # braces in prompts are left alone


@pytest.mark.parametrize("text, expected", [
    ("Final Score: 4", 4.0), ("Final Score: 4.5", 4.5), ("Final Score:5", 5.0), ("Final Score:\n 2", 2.0),
    ("cat (object): 1\nFinal Score: 3.25 out of 5", 3.25),
    ("no score here", None), ("Final Score: 6", None), ("Final Score: 0", None), ("final score: 3", None),
    ("Final Score: 2 ... later Final Score: 5", 2.0),  # the first match wins
    ("Final Score: 10", 1.0),  # Flow-GRPO's regex reads the leading digit
])
def test_parse_score_is_flow_grpos_regex(text, expected) -> None:
    assert parse_score(text) == expected


def test_card_version_and_options() -> None:
    card = make_reward("unifiedreward").card  # construction loads nothing
    assert card.name == "unifiedreward" and card.deterministic and not card.differentiable and card.higher_is_better
    assert card.weights == "CodeGoat24/UnifiedReward-qwen-7b" and "unverified" in card.license
    assert card.version == "1+CodeGoat24/UnifiedReward-qwen-7b"
    assert make_reward("unifiedreward").backend.max_new_tokens == MAX_NEW_TOKENS == 512
    fake = make_reward("unifiedreward", backend=ScriptedJudge([]))
    assert fake.card.version == "1+backend-scripted" and fake.card.weights == "none"
    assert make_reward("unifiedreward", resize=None).card.version == "1+CodeGoat24/UnifiedReward-qwen-7b+resize-none"


@pytest.mark.parametrize("options", [dict(retries=-1), dict(retries=1.5), dict(backend="sglang"),
                                     dict(backend=object()), dict(resize=0), dict(max_new_tokens=0),
                                     dict(batch_size=0), dict(dtype="int8")])
def test_bad_options_are_config_errors(options) -> None:
    with pytest.raises(ConfigError):
        make_reward("unifiedreward", **options)


# -- scoring and the re-ask policy -------------------------------------------------------------------------------


def test_scores_are_the_parsed_score_over_5_and_the_judge_sees_512px_images() -> None:
    judge = ScriptedJudge(["Final Score: 4", "a (object): 1\nFinal Score: 4.5", "Final Score:5"])
    images = smooth_images(3, 64, seed=0)
    out = make_reward("unifiedreward", backend=judge)(images, prompts(3))
    assert out.scores.tolist() == pytest.approx([0.8, 0.9, 1.0])
    assert out.scores.dtype == torch.float32
    assert out.info["reasks"] == 0 and out.info["reasked"] == [] and out.info["answers"][2] == "Final Score:5"
    (call,) = judge.calls
    assert call["temperature"] == 0.0 and call["shape"] == (3, 3, 512, 512)
    assert call["questions"] == [question(p) for p in prompts(3)]


def test_the_judges_images_are_flow_grpos_pil_resize_to_512() -> None:
    images = smooth_images(2, (96, 80), seed=1)
    seen = UnifiedReward(backend=TinyJudgeStandIn()).prepare(images)
    for i in range(2):  # flow_grpo: (x * 255).round() uint8, Image.fromarray(image).resize((512, 512))
        arr = (images[i].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        expected = np.asarray(Image.fromarray(arr).resize((512, 512)))
        assert np.array_equal((seen[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), expected)
    assert UnifiedReward(backend=TinyJudgeStandIn(), resize=None).prepare(images).shape == (2, 3, 96, 80)


def test_an_unparsed_answer_is_re_asked_with_seeded_sampling_then_scored() -> None:
    judge = ScriptedJudge(["Final Score: 2", "I cannot tell.", "Final Score: 3"],
                          sampled=lambda q, attempt: "still thinking" if attempt == 1 else "Final Score: 4.5")
    images = smooth_images(3, 64, seed=2)
    out = make_reward("unifiedreward", backend=judge)(images, prompts(3))
    assert out.scores.tolist() == pytest.approx([0.4, 0.9, 0.6])  # never 0 for image 1
    assert out.info["reasks"] == 2 and out.info["reasked"] == [1] and out.info["answers"][1] == "Final Score: 4.5"
    re_asks = judge.calls[1:]
    assert [c["n"] for c in re_asks] == [1, 1] and all(c["temperature"] == 0.7 for c in re_asks)
    assert all(c["questions"] == [question("prompt 1")] for c in re_asks)
    assert re_asks[0]["seed"] != re_asks[1]["seed"]  # each attempt its own seed


def test_answers_still_unparsed_after_the_retries_raise_naming_the_count() -> None:
    garbage = "x" * 1000
    judge = ScriptedJudge(["Final Score: 2", garbage, "nope"], sampled=lambda q, attempt: "no")
    with pytest.raises(RewardFailed) as info:
        make_reward("unifiedreward", backend=judge)(smooth_images(3, 64, seed=3), prompts(3))
    message = str(info.value)
    assert isinstance(info.value, RLBenchError)
    assert "2 of 3 images" in message and "after 2 re-ask(s)" in message and "image 1 answered 'no'" in message
    assert len(judge.calls) == 1 + 2 * 2
    # a long raw answer is truncated in the message
    judge = ScriptedJudge([garbage], sampled=lambda q, attempt: garbage)
    with pytest.raises(RewardFailed, match=r"1 of 1 images.*'x{300}\.\.\. \(1000 characters\)'") as info:
        make_reward("unifiedreward", backend=judge, retries=1)(smooth_images(1, 64), prompts(1))
    assert len(str(info.value)) < 800
    # retries=0: no re-ask at all
    judge = ScriptedJudge(["?"])
    with pytest.raises(RewardFailed, match="1 of 1 images.*after 0 re-ask"):
        make_reward("unifiedreward", backend=judge, retries=0)(smooth_images(1, 64), prompts(1))
    assert len(judge.calls) == 1


class SeedJudge:
    """Greedy answers never parse; a sampled answer's score is read off its seed (so it depends on it)."""

    def __init__(self):
        self.seeds = []

    def generate(self, images, questions, *, temperature=0.0, seed=None):
        if not temperature:
            return ["no score"] * len(questions)
        self.seeds.append(seed)
        return [f"Final Score: {1 + seed % 5}"]


def test_re_asks_are_deterministic_batch_invariant_and_depend_on_image_and_prompt() -> None:
    images = smooth_images(3, 64, seed=4)
    judge = SeedJudge()
    reward = make_reward("unifiedreward", backend=judge)
    first = reward(images, prompts(3)).scores
    seeds = list(judge.seeds)
    assert len(set(seeds)) == 3  # three images, three seeds
    assert torch.equal(reward(images, prompts(3)).scores, first) and judge.seeds[3:] == seeds  # deterministic
    alone = torch.cat([reward(images[i : i + 1], prompts(3)[i : i + 1]).scores for i in range(3)])
    assert torch.equal(alone, first) and judge.seeds[6:] == seeds  # a seed depends on its own image only
    reward(images[:1], ["another prompt"])
    reward(images[1:2], prompts(1))
    assert judge.seeds[9] != seeds[0] and judge.seeds[10] != seeds[0]  # ... and on its prompt


def test_passes_check_reward_through_tiny_reward(tmp_path) -> None:
    reward = tiny_reward("unifiedreward", tmp_path)
    check_reward(reward)
    assert reward.card.version == "1+backend-tiny-judge-stand-in"


def test_missing_weights_name_the_download_command(tmp_path, monkeypatch) -> None:
    assert_weights_missing_offline(monkeypatch, tmp_path, "unifiedreward", "CodeGoat24/UnifiedReward-qwen-7b",
                                   smooth_images(1, 64), ["a cat"])


# -- the in-process transformers judge on the tiny Qwen2.5-VL ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    # yes_scale=1: the LM head is left as drawn, so greedy answers vary from token to token
    return write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen") / "unifiedreward-qwen-tiny", yes_scale=1.0)


def _record_generate(model, monkeypatch):
    calls = []
    original = model.generate

    def generate(**kwargs):
        out = original(**kwargs)
        calls.append({**kwargs, "output": out})
        return out

    monkeypatch.setattr(model, "generate", generate)
    return calls


def test_transformers_judge_asks_the_official_prompt_greedily(tiny_qwen, monkeypatch) -> None:
    reward = UnifiedReward(weights=str(tiny_qwen), max_new_tokens=5, retries=0)
    model, processor = reward.backend.load()
    calls = _record_generate(model, monkeypatch)
    images = smooth_images(2, 64, seed=5)
    with pytest.raises(RewardFailed, match="2 of 2 images"):  # random weights: no "Final Score"
        reward(images, ["a red cat", "a dog"])
    (call,) = calls
    assert call["do_sample"] is False and call["num_beams"] == 1 and call["max_new_tokens"] == 5
    text = processor.tokenizer.decode(call["input_ids"][0], skip_special_tokens=False)
    assert text.endswith("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 324 + "<|vision_end|>"
                         + OFFICIAL_QUESTION + "<|im_end|>\n<|im_start|>assistant\n")  # 512 -> 504 px: 18x18 tokens
    assert call["image_grid_thw"].tolist() == [[1, 36, 36], [1, 36, 36]]
    # greedy: each new token is the argmax of a plain forward over everything before it (image 0, no padding)
    single = {k: v[:1] for k, v in call.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    single["pixel_values"] = call["pixel_values"][: 36 * 36]
    single["image_grid_thw"] = call["image_grid_thw"][:1]
    pad = int(call["attention_mask"][0].eq(0).sum())
    prompt_len = call["input_ids"].shape[1]
    ids = single["input_ids"][:, pad:]
    generated = call["output"][0, prompt_len:]
    assert len(set(generated.tolist())) > 2  # a varied answer: the check below is not one token over and over
    with torch.no_grad():
        for token in generated.tolist():
            new_types = torch.zeros(1, ids.shape[1] - prompt_len + pad, dtype=torch.long)  # text tokens
            batch = {**single, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                     "mm_token_type_ids": torch.cat([single["mm_token_type_ids"][:, pad:], new_types], 1)}
            nxt = int(model(**batch).logits[0, -1].argmax())
            assert nxt == token
            if token in model.generation_config.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)


def test_transformers_judge_re_asks_with_seeded_sampling_and_then_fails(tiny_qwen, monkeypatch) -> None:
    reward = UnifiedReward(weights=str(tiny_qwen), max_new_tokens=4, retries=2)
    model, _ = reward.backend.load()
    calls = _record_generate(model, monkeypatch)
    images = smooth_images(1, 64, seed=6)
    before = torch.random.get_rng_state()
    with pytest.raises(RewardFailed, match=r"1 of 1 images.*after 2 re-ask\(s\)") as info:
        reward(images, ["a red cat"])
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left alone
    assert [c["do_sample"] for c in calls] == [False, True, True]
    assert all(c["temperature"] == 0.7 and c["top_k"] == 0 and c["top_p"] == 1.0 for c in calls[1:])
    sampled = [c["output"] for c in calls[1:]]
    # the same call again samples the same answers (seeded), and the error is the same
    calls.clear()
    with pytest.raises(RewardFailed) as again:
        reward(images, ["a red cat"])
    assert str(again.value) == str(info.value)
    assert all(torch.equal(a, c["output"]) for a, c in zip(sampled, calls[1:]))


def test_describer_sampling_needs_a_seed_and_is_reproducible(tiny_qwen) -> None:
    vlm = UnifiedReward(weights=str(tiny_qwen), max_new_tokens=8).backend
    image = smooth_images(1, 64, seed=7)
    with pytest.raises(ValueError, match="seed"):
        vlm.generate(image, ["q"], temperature=0.7)
    a = vlm.generate(image, ["q"], temperature=0.7, seed=1)
    assert vlm.generate(image, ["q"], temperature=0.7, seed=1) == a
    assert any(vlm.generate(image, ["q"], temperature=0.7, seed=s) != a for s in (2, 3, 4))
