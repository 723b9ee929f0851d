"""Offline-first weight resolution (rlbench.weights) and `rlbench rewards download`."""

from __future__ import annotations

import hashlib
import io

import pytest

from helpers import run_cli
from rlbench import weights as hub
from rlbench.errors import WeightsNotAvailable
from rlbench.weights import WeightsSpec

URL = "https://example.invalid/models/head.pth"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf"


def test_an_existing_local_override_is_used_as_is(tmp_path) -> None:
    f = tmp_path / "w.pth"
    f.write_bytes(b"x")
    spec = WeightsSpec("org/model", filename="w.pth")
    assert hub.resolve(spec, reward="r", override=f) == f
    assert hub.resolve(spec, reward="r", override=str(tmp_path)) == tmp_path


def test_a_bad_override_names_the_option(empty_cache) -> None:
    spec = WeightsSpec("org/model", option="clip")
    with pytest.raises(WeightsNotAvailable, match=r"clip='\./nope' for reward 'r' is neither an existing local path"):
        hub.resolve(spec, reward="r", override="./nope")


def test_missing_hub_weights_offline_name_the_download_command(empty_cache) -> None:
    spec = WeightsSpec("org/model", filename="w.safetensors", revision="a" * 40)
    with pytest.raises(WeightsNotAvailable) as err:
        hub.resolve(spec, reward="my-reward")
    msg = str(err.value)
    assert "rlbench rewards download my-reward" in msg and "--reward-opt weights=PATH" in msg
    assert "HF_HUB_OFFLINE" in msg
    # A hub-id override replaces the source (and its pin) and fails the same way, naming the new source.
    with pytest.raises(WeightsNotAvailable, match="other/model"):
        hub.resolve(spec, reward="my-reward", override="other/model")


def test_url_weights_are_checked_cached_and_then_found_offline(empty_cache, monkeypatch) -> None:
    payload = b"weights-bytes"
    spec = WeightsSpec(URL, filename="head.pth", sha256=hashlib.sha256(payload).hexdigest())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotAvailable, match="rlbench rewards download aes"):
        hub.resolve(spec, reward="aes")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []

    def fake_urlopen(url, timeout):
        calls.append((url, timeout))
        return io.BytesIO(payload)

    monkeypatch.setattr(hub.urllib.request, "urlopen", fake_urlopen)
    path = hub.resolve(spec, reward="aes")
    assert path.read_bytes() == payload and calls == [(URL, hub.URL_TIMEOUT_S)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve(spec, reward="aes") == path  # cached: no network needed any more
    assert len(calls) == 1


def test_a_corrupted_url_download_is_refused_and_not_kept(empty_cache, monkeypatch) -> None:
    spec = WeightsSpec(URL, filename="head.pth", sha256="0" * 64)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"tampered"))
    with pytest.raises(WeightsNotAvailable, match="does not have the pinned sha256"):
        hub.resolve(spec, reward="aes")
    assert not hub.url_cache_path(spec).exists()
    assert not list(hub.url_cache_path(spec).parent.glob("*.part"))


def test_specs_and_card_list_every_source() -> None:
    from rlbench import make_reward

    card = make_reward("imagereward").card
    assert "THUDM/ImageReward/ImageReward.pt@" in card.weights and "bert-base-uncased" in card.weights


def test_cli_download_offline_is_a_clear_error_and_shipped_rewards_need_nothing() -> None:
    proc = run_cli(["rewards", "download", "pickscore"])
    assert proc.returncode == 2 and "HF_HUB_OFFLINE" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(["rewards", "download", "shapes-clip"])
    assert proc.returncode == 0 and "no weights to download" in proc.stdout


@pytest.mark.parametrize("value, offline", [("1", True), ("ON", True), ("yes", True), ("True", True),
                                            ("0", False), ("off", False), ("", False)])
def test_one_offline_check_reads_hf_hub_offline_as_the_hub_does(monkeypatch, value, offline) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub.is_offline() is offline


@pytest.mark.parametrize("value", ["1", "ON"])
def test_the_policy_uses_the_same_offline_check(monkeypatch, value) -> None:
    """With HF_HUB_OFFLINE set (any spelling the hub accepts) a hub model missing from the cache is an error
    naming the fix, and no download is attempted."""
    from diffusers import UNet2DConditionModel

    from rlbench.diffusion.policy import DiffusionPolicy

    tried = []

    def from_pretrained(source, subfolder=None, local_files_only=False, **kwargs):
        tried.append(local_files_only)
        raise OSError(f"{source} is not in the cache")

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", from_pretrained)
    with pytest.raises(WeightsNotAvailable, match="hf download org/missing-model"):
        DiffusionPolicy.from_pretrained("org/missing-model")
    assert tried == [True]  # the cache only: never local_files_only=False
