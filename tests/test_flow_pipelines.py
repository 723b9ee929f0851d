"""The tiny flow-matching pipelines of rlbench.testing: SD3 and FLUX.1, saved and reloaded offline by path."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # conftest sets it too; these tests must never reach the Hub

import socket  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import FluxPipeline, StableDiffusion3Pipeline  # noqa: E402

from rlbench.testing import (  # noqa: E402
    FLUX_DEV_SCHEDULER_CONFIG,
    FLUX_SCHNELL_SCHEDULER_CONFIG,
    TINY_FLOW_TEXT_DIM,
    TINY_FLUX_IMAGE_SIZE,
    TINY_SD3_IMAGE_SIZE,
    save_tiny_flux_pipeline,
    save_tiny_sd3_pipeline,
    tiny_flux_components,
    tiny_sd3_components,
    tiny_t5_tokenizer,
)

PROMPT = "a red circle"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-threaded torch for this module: the models are tiny, and with a second busy process on a
    2-core machine, 2 intra-op threads made these tests 6x slower (40 s instead of 7 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd3_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return {t5: save_tiny_sd3_pipeline(root / f"t5-{t5}", t5=t5) for t5 in (True, False)}


@pytest.fixture(scope="module")
def flux_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {g: save_tiny_flux_pipeline(root / f"guidance-{g}", guidance_embeds=g) for g in (True, False)}


def _load_sd3(path, t5: bool) -> StableDiffusion3Pipeline:
    extra = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_flux(path) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, **kwargs) -> np.ndarray:
    out = pipe(prompt=PROMPT, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0), **kwargs)
    return out.images


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = _state(a), _state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- SD3 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no-t5"])
def test_sd3_reloads_by_path_and_generates(sd3_folders, t5):
    pipe = _load_sd3(sd3_folders[t5], t5)
    assert pipe.vae_scale_factor == 1 and pipe.patch_size == 2 and pipe.tokenizer_max_length == 77
    assert (pipe.text_encoder_3 is None) == (not t5) and (pipe.tokenizer_3 is None) == (not t5)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting

    prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(PROMPT, None, None)
    # CLIP-L + CLIP-G (77 tokens) then T5 (max_sequence_length 256), all 32 wide; pooled = 32 + 32.
    assert prompt_embeds.shape == negative_embeds.shape == (1, 77 + 256, TINY_FLOW_TEXT_DIM)
    assert pooled.shape == negative_pooled.shape == (1, 64)
    if not t5:
        assert torch.count_nonzero(prompt_embeds[:, 77:]) == 0  # zeros stand in for the missing T5

    images = _generate(pipe)  # default size: transformer.sample_size * vae_scale_factor
    assert images.shape == (1, TINY_SD3_IMAGE_SIZE, TINY_SD3_IMAGE_SIZE, 3)
    assert np.isfinite(images).all()
    assert _generate(pipe, height=16, width=24).shape == (1, 16, 24, 3)


def test_sd3_without_t5_needs_the_none_components_again(sd3_folders):
    with pytest.raises(ValueError, match="expected"):
        StableDiffusion3Pipeline.from_pretrained(sd3_folders[False])


def test_sd3_reload_matches_in_memory_pipeline(sd3_folders):
    reference = StableDiffusion3Pipeline(**tiny_sd3_components())
    reference.set_progress_bar_config(disable=True)
    # Not bit-equal: weights loaded from safetensors are only 4-byte aligned, so BLAS may take another
    # kernel (seen: 1 ulp in CLIP's text_projection). Two loads of one folder do agree exactly.
    loaded = _generate(_load_sd3(sd3_folders[True], True))
    np.testing.assert_allclose(loaded, _generate(reference), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(loaded, _generate(_load_sd3(sd3_folders[True], True)))


def test_sd3_transformer_shapes_and_pos_embed_limit():
    transformer = tiny_sd3_components(t5=False)["transformer"]
    assert transformer.config.pos_embed_max_size == 32  # 2 * sample_size / patch_size: images up to 64 px
    text, pooled = torch.zeros(1, 5, TINY_FLOW_TEXT_DIM), torch.zeros(1, 64)
    with torch.no_grad():
        for size in (8, 64):
            x = torch.randn(1, 4, size, size)
            out = transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                              pooled_projections=pooled, return_dict=False)[0]
            assert out.shape == x.shape
        with pytest.raises(ValueError):
            transformer(hidden_states=torch.randn(1, 4, 66, 66), timestep=torch.tensor([500.0]),
                        encoder_hidden_states=text, pooled_projections=pooled)


# -- FLUX -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_flux_reloads_by_path_and_generates(flux_folders, guidance_embeds):
    pipe = _load_flux(flux_folders[guidance_embeds])
    assert pipe.transformer.config.guidance_embeds is guidance_embeds
    assert pipe.vae_scale_factor == 1 and pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    expected = FLUX_DEV_SCHEDULER_CONFIG if guidance_embeds else FLUX_SCHNELL_SCHEDULER_CONFIG
    assert {k: pipe.scheduler.config[k] for k in expected} == expected

    prompt_embeds, pooled, text_ids = pipe.encode_prompt(PROMPT, None)
    assert prompt_embeds.shape == (1, 512, TINY_FLOW_TEXT_DIM)  # T5, max_sequence_length 512
    assert pooled.shape == (1, 32) and text_ids.shape == (512, 3)

    size = TINY_FLUX_IMAGE_SIZE
    images = _generate(pipe, height=size, width=size, max_sequence_length=64)
    assert images.shape == (1, size, size, 3)
    assert np.isfinite(images).all()
    assert np.isfinite(_generate(pipe, height=8, width=12)).all()


def test_flux_reload_matches_in_memory_pipeline(flux_folders):
    reference = FluxPipeline(**tiny_flux_components())
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(height=TINY_FLUX_IMAGE_SIZE, width=TINY_FLUX_IMAGE_SIZE)
    loaded = _generate(_load_flux(flux_folders[True]), **kwargs)
    np.testing.assert_allclose(loaded, _generate(reference, **kwargs), rtol=0, atol=1e-5)  # see the SD3 test
    np.testing.assert_array_equal(loaded, _generate(_load_flux(flux_folders[True]), **kwargs))


@pytest.mark.parametrize(("channels", "height", "width", "vae_scale_factor"),
                         [(1, 16, 16, 1), (1, 8, 12, 1), (16, 8, 6, 8)], ids=["tiny", "tiny-rect", "flux-like"])
def test_flux_pack_unpack_round_trip(channels, height, width, vae_scale_factor):
    z = torch.randn(2, channels, height, width)
    packed = FluxPipeline._pack_latents(z, 2, channels, height, width)
    assert packed.shape == (2, (height // 2) * (width // 2), 4 * channels)
    image_h, image_w = height * vae_scale_factor, width * vae_scale_factor  # _unpack_latents takes pixel sizes
    assert torch.equal(FluxPipeline._unpack_latents(packed, image_h, image_w, vae_scale_factor), z)


# -- builders -------------------------------------------------------------------------------------------

def test_same_seed_same_weights_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    for build in (tiny_sd3_components, tiny_flux_components):
        a, b, c = build(seed=0), build(seed=0), build(seed=1)
        models = [k for k, v in a.items() if isinstance(v, torch.nn.Module)]
        assert len(models) >= 4
        for name in models:
            assert _same_weights(a[name], b[name]), name
            assert not _same_weights(a[name], c[name]), name
    assert torch.equal(torch.random.get_rng_state(), state)
    # components are seeded independently: options of one do not change the others
    with_t5, without = tiny_sd3_components(t5=True), tiny_sd3_components(t5=False)
    assert all(_same_weights(with_t5[k], without[k]) for k in ("transformer", "vae", "text_encoder", "text_encoder_2"))


def test_t5_tokenizer_is_t5_like(tmp_path):
    from transformers import AutoTokenizer

    tok = tiny_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok(PROMPT, padding="max_length", max_length=16, truncation=True).input_ids
    assert len(ids) == 16 and ids[ids.index(1) + 1:] == [0] * (15 - ids.index(1))
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(PROMPT).input_ids == tok(PROMPT).input_ids
