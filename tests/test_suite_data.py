"""The evaluation suites' prompt files (rlbench/suitedata.py): pinned by sha256, read from RLBENCH_DATA_DIR (the
shared copies in ../shared/data, as CI has them) or the data cache, fetched on request; never the network here
(downloads are tested from file:// copies)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from rlbench import suitedata
from rlbench.errors import InputError, WeightsNotAvailable
from rlbench.prompts import load_prompts

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "geneval").is_dir(), reason="../shared/data is not on this machine")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setattr(suitedata, "cache_dir", lambda: folder)
    monkeypatch.delenv(suitedata.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


@needs_shared
def test_the_suites_prompt_sets_from_the_shared_copies(monkeypatch):
    monkeypatch.setenv(suitedata.DATA_DIR_ENV, str(SHARED))
    geneval = load_prompts("geneval")
    assert len(geneval.prompts) == 553 and geneval.prompts[0] == "a photo of a bench"
    tags = {m["tag"] for m in geneval.metadata}
    assert tags == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    counting = [m for m in geneval.metadata if m["tag"] == "counting"]
    assert counting and all("exclude" in m for m in counting)  # count + 1 excluded (shared/data/README.md)
    ocr = load_prompts("flow-grpo-ocr")
    assert len(ocr.prompts) == 1018  # no final newline: `wc -l` says 1,017
    assert all(m["text"] for m in ocr.metadata)  # every prompt quotes the text to render
    for category in suitedata.COMPBENCH_SHA256:
        ps = load_prompts("t2i-compbench-" + category.replace("_", "-"))
        assert len(ps.prompts) == 300 and ps.metadata[0] == {"category": category}


@needs_shared
def test_an_altered_copy_is_refused_naming_it(tmp_path, monkeypatch):
    local = tmp_path / "data"
    shutil.copytree(SHARED, local)
    target = local / "geneval" / "evaluation_metadata.jsonl"
    target.chmod(0o644)
    target.write_text(target.read_text() + "\n")
    monkeypatch.setenv(suitedata.DATA_DIR_ENV, str(local))
    with pytest.raises(InputError, match="is not the pinned geneval/evaluation_metadata.jsonl") as info:
        load_prompts("geneval")
    assert str(target) in str(info.value)
    (local / "flow-grpo-ocr" / "test.txt").chmod(0o644)
    (local / "flow-grpo-ocr" / "test.txt").unlink()
    with pytest.raises(InputError, match="has no flow-grpo-ocr/test.txt"):
        load_prompts("flow-grpo-ocr")


def test_offline_and_not_cached_names_the_download_command(cache, runner):
    from rlbench.cli import app

    with pytest.raises(WeightsNotAvailable, match="rlbench prompts download t2i-compbench"):
        load_prompts("t2i-compbench-color")
    res = runner.invoke(app, ["prompts", "show", "geneval"])
    assert res.exit_code == 2
    assert "rlbench prompts download geneval" in res.output and "Traceback" not in res.output


@needs_shared
def test_download_checks_the_sha256_and_fills_the_cache(cache, monkeypatch, runner):
    from rlbench.cli import app

    files = tuple(replace(f, url=(SHARED / f.path).as_uri()) for f in suitedata.DATASETS["geneval"])
    monkeypatch.setitem(suitedata.DATASETS, "geneval", files)
    monkeypatch.setattr(suitedata, "FILES", {**suitedata.FILES, **{f.path: f for f in files}})
    res = runner.invoke(app, ["prompts", "download", "geneval"])
    assert res.exit_code == 0, res.output
    assert (cache / "geneval" / "evaluation_metadata.jsonl").is_file()
    assert len(load_prompts("geneval").prompts) == 553  # offline now: from the cache
    # A source whose bytes changed: refused, nothing kept in the cache.
    bad = tuple(replace(f, sha256="0" * 64) for f in suitedata.DATASETS["flow-grpo-ocr"])
    bad = tuple(replace(f, url=(SHARED / f.path).as_uri()) for f in bad)
    monkeypatch.setitem(suitedata.DATASETS, "flow-grpo-ocr", bad)
    res = runner.invoke(app, ["prompts", "download", "flow-grpo-ocr"])
    assert res.exit_code == 2 and "does not have the pinned sha256" in res.output
    assert not (cache / "flow-grpo-ocr").exists() or not any((cache / "flow-grpo-ocr").iterdir())


def test_unknown_dataset_suggests_the_name(runner):
    from rlbench.cli import app

    with pytest.raises(InputError, match="Did you mean 'geneval'"):
        suitedata.dataset_of("genevl")
    assert suitedata.dataset_of("t2i-compbench-color") == "t2i-compbench"
    res = runner.invoke(app, ["prompts", "download", "genevl"])
    assert res.exit_code == 2 and "Did you mean 'geneval'" in res.output
