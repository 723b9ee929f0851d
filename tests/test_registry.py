"""Plugin registries over entry points: discovery without imports, lazy loading, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import run_cli, subprocess_env
from rlbench.errors import PluginLoadError, RegistrationError, UnknownNameError
from rlbench.registry import PROMPTS, REWARDS
from rlbench.registry import make_reward

GROUP = "rlbench.rewards"

GOOD_MODULE = """
import torch

IMPORTED = True


class LazyReward:
    name = "lazy"

    def __call__(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))
"""

BOOM_MODULE = """
raise RuntimeError("boom at import time")
"""


def test_builtin_rewards_come_from_rlbench_own_entry_points() -> None:
    names = REWARDS.names()
    assert {"incompressibility", "compressibility"} <= set(names)
    entry = REWARDS.entry("incompressibility")
    assert entry.origin == "rlbench==0.1.0"
    assert entry.target == "rlbench.rewards.jpeg:Incompressibility"
    assert "simple-animals" in PROMPTS.names()


def test_listing_imports_no_plugin_code(fake_dist) -> None:
    fake_dist("fakepkg", "0.1", {GROUP: {"boom": "rlb_fake_boom:Thing"}}, {"rlb_fake_boom": BOOM_MODULE})
    assert "boom" in REWARDS.names()
    assert "boom" in REWARDS
    [entry] = [e for e in REWARDS.entries() if e.name == "boom"]
    assert entry.origin == "fakepkg==0.1"
    assert entry.target == "rlb_fake_boom:Thing"
    assert "rlb_fake_boom" not in sys.modules  # listing read metadata only; the module would raise


def test_listing_builtins_in_a_fresh_process_imports_no_plugin() -> None:
    code = (
        "import sys\n"
        "from rlbench.registry import REWARDS\n"
        "assert 'incompressibility' in REWARDS.names()\n"
        "print(sorted(m for m in sys.modules if m.startswith('rlbench.rewards.')))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "False"]


def test_plugins_load_lazily_and_once(fake_dist) -> None:
    fake_dist("fakepkg", "0.1", {GROUP: {"lazy": "rlb_fake_lazy:LazyReward"}}, {"rlb_fake_lazy": GOOD_MODULE})
    assert "lazy" in REWARDS.names()
    assert "rlb_fake_lazy" not in sys.modules
    cls = REWARDS.load("lazy")
    assert "rlb_fake_lazy" in sys.modules
    assert cls is sys.modules["rlb_fake_lazy"].LazyReward
    assert REWARDS.load("lazy") is cls
    reward = make_reward("lazy")
    assert reward.card.origin == "fakepkg==0.1"


def test_unknown_name_suggests_the_close_name_and_lists_available() -> None:
    with pytest.raises(UnknownNameError) as info:
        REWARDS.load("incompresibility")
    msg = str(info.value)
    assert "unknown reward 'incompresibility'" in msg
    assert "Did you mean: 'incompressibility'" in msg
    assert "Available: " in msg
    for name in REWARDS.names():
        assert name in msg.split("Available: ")[1]
    assert "rlbench rewards list" in msg
    assert isinstance(info.value, KeyError)  # dict-like lookups may catch it as KeyError
    with pytest.raises(UnknownNameError, match="Did you mean: 'incompressibility'"):
        make_reward("incompresibility")


def test_unknown_name_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(UnknownNameError) as info:
        REWARDS.entry("zzzz-nothing-like-it")
    assert "Did you mean" not in str(info.value)
    assert "Available: " in str(info.value)


def test_same_name_from_two_distributions_is_an_error_naming_both(fake_dist) -> None:
    fake_dist("fakepkg-a", "0.1", {GROUP: {"dupreward": "rlb_fake_a:R"}}, {"rlb_fake_a": GOOD_MODULE})
    fake_dist("fakepkg-b", "0.2", {GROUP: {"dupreward": "rlb_fake_b:R"}}, {"rlb_fake_b": GOOD_MODULE})
    assert REWARDS.names().count("dupreward") == 1
    assert sorted(e.origin for e in REWARDS.conflicts()["dupreward"]) == ["fakepkg-a==0.1", "fakepkg-b==0.2"]
    for call in (REWARDS.entry, REWARDS.load, make_reward):
        with pytest.raises(RegistrationError) as info:
            call("dupreward")
        msg = str(info.value)
        assert "fakepkg-a==0.1" in msg and "fakepkg-b==0.2" in msg
        assert "registered twice" in msg
    assert "rlb_fake_a" not in sys.modules and "rlb_fake_b" not in sys.modules
    make_reward("incompressibility")  # other names are unaffected


def test_one_distribution_seen_twice_on_sys_path_is_not_a_conflict(fake_dist, tmp_path) -> None:
    eps = {GROUP: {"twice": "rlb_fake_twice:LazyReward"}}
    fake_dist("fakepkg", "0.1", eps, {"rlb_fake_twice": GOOD_MODULE}, folder=tmp_path / "one")
    fake_dist("fakepkg", "0.1", eps, {"rlb_fake_twice": GOOD_MODULE}, folder=tmp_path / "two")
    assert "twice" not in REWARDS.conflicts()
    assert REWARDS.load("twice").__name__ == "LazyReward"


def test_broken_plugin_names_plugin_distribution_and_cause(fake_dist) -> None:
    fake_dist("fakepkg", "0.1", {GROUP: {"boom": "rlb_fake_boom:Thing"}}, {"rlb_fake_boom": BOOM_MODULE})
    with pytest.raises(PluginLoadError) as info:
        REWARDS.load("boom")
    msg = str(info.value)
    assert "'boom'" in msg
    assert "fakepkg==0.1" in msg
    assert "rlb_fake_boom:Thing" in msg
    assert "RuntimeError: boom at import time" in msg
    with pytest.raises(PluginLoadError):
        make_reward("boom")
    # Everything else still lists and loads.
    assert {"boom", "incompressibility", "compressibility"} <= set(REWARDS.names())
    assert REWARDS.load("incompressibility").__name__ == "Incompressibility"


def test_missing_attribute_is_a_plugin_load_error(fake_dist) -> None:
    fake_dist("fakepkg", "0.1", {GROUP: {"noattr": "rlb_fake_noattr:Missing"}}, {"rlb_fake_noattr": GOOD_MODULE})
    with pytest.raises(PluginLoadError, match="AttributeError"):
        REWARDS.load("noattr")


def test_cli_lists_broken_plugin_as_broken_and_still_lists_the_rest(fake_dist, runner) -> None:
    from rlbench.cli import app

    fake_dist("fakepkg", "0.1", {GROUP: {"boom": "rlb_fake_boom:Thing"}}, {"rlb_fake_boom": BOOM_MODULE})
    result = runner.invoke(app, ["rewards", "list"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    [boom] = [line for line in lines if line.split() and line.split()[0] == "boom"]
    assert "BROKEN" in boom and "fakepkg==0.1" in boom
    for name in ("incompressibility", "compressibility"):
        [row] = [line for line in lines if line.split() and line.split()[0] == name]
        assert "rlbench==0.1.0" in row and "BROKEN" not in row


def test_cli_subprocess_lists_broken_plugin(fake_dist) -> None:
    site = fake_dist("fakepkg", "0.1", {GROUP: {"boom": "rlb_fake_boom:Thing"}}, {"rlb_fake_boom": BOOM_MODULE})
    out = run_cli(["rewards", "list"], site)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.split()}
    assert "BROKEN" in rows["boom"] and "boom at import time" in rows["boom"]
    assert "BROKEN" not in rows["incompressibility"] and "BROKEN" not in rows["compressibility"]


def test_cli_lists_conflicting_names(fake_dist, runner) -> None:
    from rlbench.cli import app

    fake_dist("fakepkg-a", "0.1", {GROUP: {"dupreward": "rlb_fake_a:R"}}, {"rlb_fake_a": GOOD_MODULE})
    fake_dist("fakepkg-b", "0.2", {GROUP: {"dupreward": "rlb_fake_b:R"}}, {"rlb_fake_b": GOOD_MODULE})
    result = runner.invoke(app, ["rewards", "list"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.split() and line.split()[0] == "dupreward"]
    assert len(rows) == 2 and all("CONFLICT" in r for r in rows)
    assert "fakepkg-a==0.1" in result.stdout and "fakepkg-b==0.2" in result.stdout


def test_in_process_registration(register_reward) -> None:
    from helpers import GenericTestReward, mean_pixel

    obj = GenericTestReward(mean_pixel)
    register_reward("local-mean", obj)
    assert "local-mean" in REWARDS.names()
    assert REWARDS.entry("local-mean").origin == "local"
    assert REWARDS.load("local-mean") is obj
    with pytest.raises(RegistrationError, match="rlbench==0.1.0"):
        REWARDS.register("incompressibility", obj)
    REWARDS.unregister("local-mean")
    assert "local-mean" not in REWARDS.names()
    with pytest.raises(UnknownNameError):
        REWARDS.load("local-mean")
