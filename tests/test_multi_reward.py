"""Weighted combinations of registered rewards: ``--reward a:1.0,b:0.5``."""

from __future__ import annotations

import pytest
import torch

from helpers import random_images, run_cli, write_png
from rlbench import make_reward
from rlbench.checker import check_reward
from rlbench.errors import ConfigError, UnknownNameError
from rlbench.combine import parse_spec


def test_parse_spec_accepts_plus_and_comma_and_default_weight() -> None:
    assert parse_spec("a:1.0,b:0.5") == [("a", 1.0), ("b", 0.5)]
    assert parse_spec("a + b:-2") == [("a", 1.0), ("b", -2.0)]


@pytest.mark.parametrize("spec, words", [
    ("a:x", "not a number"), ("a,,b", "empty component"), ("a:1,a:2", "twice"), ("a:inf", "finite"),
])
def test_bad_specs_name_the_problem(spec, words) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_spec(spec)


def test_weighted_sum_equals_sum_of_components_and_reports_them() -> None:
    images, prompts = random_images(4, 32, seed=3), ["a red circle"] * 4
    combined = make_reward("incompressibility:1.0,shapes-gold:-2.5")
    out = combined(images, prompts)
    inc = make_reward("incompressibility")(images, prompts).scores
    gold = make_reward("shapes-gold")(images, prompts).scores
    torch.testing.assert_close(out.scores, inc - 2.5 * gold)
    assert set(out.info["components"]) == {"incompressibility", "shapes-gold"}
    torch.testing.assert_close(out.info["components"]["shapes-gold"], gold)
    card = combined.card
    assert card.name == "incompressibility:1+shapes-gold:-2.5" and card.origin == "combined"
    assert "incompressibility@1" in card.version and not card.differentiable
    check_reward(combined)


def test_component_options_are_routed_by_prefix() -> None:
    combined = make_reward("shapes-clip:1+shapes-aesthetic:1", **{"shapes-clip.batch_size": 2})
    assert combined.components[0][2].reward.batch_size == 2
    with pytest.raises(ConfigError, match="must name its component"):
        make_reward("shapes-clip:1+shapes-aesthetic:1", batch_size=2)
    with pytest.raises(UnknownNameError, match="shapes-gold"):
        make_reward("shapes-golden:1,incompressibility:1")


def test_cli_scores_a_combination(tmp_path) -> None:
    import numpy as np

    img = write_png(tmp_path / "a.png", np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    proc = run_cli(["rewards", "score", "incompressibility:2,compressibility:1", str(img)])
    assert proc.returncode == 0, proc.stderr
    single = run_cli(["rewards", "score", "incompressibility", str(img)])
    assert float(proc.stdout.split("\t")[1]) == pytest.approx(float(single.stdout.split("\t")[1]), rel=1e-5)
    bad = run_cli(["rewards", "score", "incompressibility:two", str(img)])
    assert bad.returncode == 2 and "not a number" in bad.stderr and "Traceback" not in bad.stderr
