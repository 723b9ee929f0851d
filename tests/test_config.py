"""Typed configuration: sources and precedence, clear errors, plugin options, TOML round trips."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from rlbench.config import (
    SECTIONS,
    TrainConfig,
    annotated_defaults,
    load_config,
    parse_override,
)
from rlbench.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def write(tmp_path, text: str, name: str = "cfg.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_valid_and_match_reference_values() -> None:
    cfg = TrainConfig().validate()  # the dataclass defaults: the DDPO reference values
    assert (cfg.run.seed, cfg.sample.num_steps, cfg.sample.eta, cfg.sample.guidance_scale) == (42, 50, 1.0, 5.0)
    assert (cfg.reward.name, cfg.algorithm.name, cfg.model.name) == ("incompressibility", "ddpo-is", "shapes")
    assert cfg.samples_per_epoch == 32 and cfg.samples_per_update == 8 and cfg.updates_per_epoch == 4


def test_precedence_defaults_file_set_values(tmp_path) -> None:
    path = write(tmp_path, """
[run]
epochs = 7
seed = 1

[sample]
batch_size = 16
eta = 0.5

[train]
learning_rate = 1e-5
""")
    cfg = load_config(path)
    assert (cfg.run.epochs, cfg.run.seed, cfg.sample.batch_size, cfg.sample.eta) == (7, 1, 16, 0.5)
    assert cfg.train.learning_rate == 1e-5
    assert cfg.sample.num_steps == 10  # untouched: the shapes model's preset

    cfg = load_config(path, ["run.epochs=9", "sample.eta=0.25", "model.name=my-model"])
    assert (cfg.run.epochs, cfg.run.seed, cfg.sample.eta, cfg.model.name) == (9, 1, 0.25, "my-model")

    cfg = load_config(path, ["run.epochs=9", "run.seed=2"], values={"run": {"epochs": 11, "seed": None}})
    assert cfg.run.epochs == 11  # values win over --set
    assert cfg.run.seed == 2  # None in values means "not given"


def test_later_set_wins_and_ints_become_floats() -> None:
    cfg = load_config(overrides=["run.epochs=3", "run.epochs=4", "sample.eta=1", "train.cfg=false"])
    assert cfg.run.epochs == 4
    assert cfg.sample.eta == 1.0 and isinstance(cfg.sample.eta, float)
    assert cfg.train.cfg is False


def test_parse_override_values() -> None:
    assert parse_override("sample.batch_size=8") == ("sample", "batch_size", 8)
    assert parse_override(" train.learning_rate = 3e-4 ") == ("train", "learning_rate", 3e-4)
    assert parse_override("train.cfg=true") == ("train", "cfg", True)
    assert parse_override("model.name=shapes") == ("model", "name", "shapes")  # bare word -> string
    assert parse_override('model.name="a b"') == ("model", "name", "a b")
    assert parse_override("run.out=runs/x-1") == ("run", "out", "runs/x-1")
    assert parse_override('model.lora_targets=["to_q","to_v"]') == ("model", "lora_targets", ["to_q", "to_v"])
    assert parse_override("reward.url=http://x/y?a=b") == ("reward", "url", "http://x/y?a=b")


@pytest.mark.parametrize("text", ["sample.batch_size", "batch_size=8", "=8", ".x=1", "sample.=1"])
def test_bad_set_syntax(text) -> None:
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        parse_override(text)
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        load_config(overrides=[text])


def test_unknown_section(tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[sampel]\nbatch_size = 8\n"))
    msg = str(info.value)
    assert "unknown section [sampel]" in msg and "Did you mean 'sample'?" in msg
    assert "cfg.toml" in msg  # names the file
    with pytest.raises(ConfigError, match="unknown section \\[sampel\\]"):
        load_config(overrides=["sampel.batch_size=8"])


def test_unknown_key_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["sample.batch_sise=8"])
    msg = str(info.value)
    assert "unknown key 'sample.batch_sise'" in msg
    assert "Did you mean 'sample.batch_size'?" in msg
    assert "num_steps" in msg  # lists the valid keys


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("sample.batch_size=eight", "sample.batch_size must be an integer, got 'eight' (str)"),
        ("sample.batch_size=8.0", "sample.batch_size must be an integer, got 8.0 (float)"),
        ("sample.eta=true", "sample.eta must be a number, got True (bool)"),
        ("train.cfg=1", "train.cfg must be true or false, got 1 (int)"),
        ("model.name=3", "model.name must be a string, got 3 (int)"),
        ("model.lora_targets=to_q", "model.lora_targets must be a list"),
    ],
)
def test_wrong_type_message(override, fragment) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert fragment in str(info.value)


def test_top_level_key_must_be_a_section(tmp_path) -> None:
    with pytest.raises(ConfigError, match="must be a \\[section\\] table"):
        load_config(write(tmp_path, "epochs = 3\n"))


def test_missing_and_invalid_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(write(tmp_path, "[run\nepochs = \n"))


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["sample.batch_size=6", "train.batch_size=4"],
         ["sample.batch_size (6) must be a multiple of train.batch_size (4)", "[1, 2, 3, 6]"]),
        (["sample.batch_size=4", "sample.num_batches_per_epoch=1", "train.batch_size=4",
          "train.gradient_accumulation_steps=2"],
         ["samples per epoch", "= 4", "must be a multiple of samples per optimizer step", "= 8"]),
        (["advantage.min_count=17", "advantage.buffer_size=16"],
         ["advantage.min_count (17) exceeds advantage.buffer_size (16)"]),
        (["sample.batch_size=4", "sample.num_batches_per_epoch=3", "sample.images_per_prompt=5", "train.batch_size=4"],
         ["sample.images_per_prompt (5) must divide the samples per epoch", "= 12", "[1, 2, 3, 4, 6, 12]"]),
        (["sample.images_per_prompt=0"], ["sample.images_per_prompt must be > 0, got 0"]),
        (["train.timestep_fraction=0"], ["train.timestep_fraction must be in (0, 1], got 0.0"]),
        (["train.timestep_fraction=1.5"], ["train.timestep_fraction must be in (0, 1], got 1.5"]),
        (["model.train_mode=half"], ["model.train_mode = 'half' is not one of 'lora', 'full'"]),
        (["model.mixed_precision=fp8"], ["model.mixed_precision = 'fp8' is not one of"]),
        (["run.epochs=0"], ["run.epochs must be > 0, got 0"]),
        (["sample.eta=-0.1"], ["sample.eta must be >= 0, got -0.1"]),
        (["train.adam_beta2=1.0"], ["adam_beta2 must be in [0, 1)"]),
        (["reward.name="], ["reward.name is empty"]),
    ],
)
def test_impossible_combinations(overrides, fragments) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_min_count_above_buffer_is_fine_without_per_prompt_stats() -> None:
    cfg = load_config(overrides=["advantage.min_count=17", "advantage.per_prompt=false"])
    assert cfg.advantage.min_count == 17


def test_plugin_options_collected_and_written_back_flat(tmp_path) -> None:
    path = write(tmp_path, """
[algorithm]
name = "ddpo-is"
clip_range = 0.0002

[reward]
name = "incompressibility"
num_workers = 2
""")
    cfg = load_config(path, ["algorithm.adv_clip_max=3", "reward.weights=/w.pt"])
    assert cfg.algorithm.options == {"clip_range": 0.0002, "adv_clip_max": 3}
    assert cfg.reward.options == {"num_workers": 2, "weights": "/w.pt"}
    written = tomllib.loads(cfg.to_toml())
    assert written["algorithm"] == {"name": "ddpo-is", "clip_range": 0.0002, "adv_clip_max": 3}
    assert written["reward"] == {"name": "incompressibility", "num_workers": 2, "weights": "/w.pt"}
    assert "options" not in written["reward"]
    # An explicit [reward.options] table is accepted too and flattened the same way.
    cfg2 = load_config(write(tmp_path, '[reward]\nname = "x"\n[reward.options]\nnum_workers = 2\n', "b.toml"))
    assert cfg2.reward.options == {"num_workers": 2}


def test_round_trip(tmp_path) -> None:
    original = load_config(overrides=[
        "run.epochs=3", "run.out=runs/x", "model.lora_targets=[\"to_q\"]", "sample.eta=0.5",
        "train.learning_rate=1e-5", "algorithm.clip_range=0.001", "reward.weights=abc", "train.cfg=false",
        "advantage.per_prompt=false",
    ])
    path = write(tmp_path, original.to_toml(), "config.toml")
    again = load_config(path)
    assert again == original
    assert again.to_toml() == original.to_toml()
    assert TrainConfig.from_dict(tomllib.loads(TrainConfig().to_toml())) == TrainConfig()


def test_annotated_defaults_is_valid_toml_equal_to_the_defaults() -> None:
    text = annotated_defaults()
    assert tomllib.loads(text) == TrainConfig().to_dict()
    # every field is documented with its help text
    for sname, scls in SECTIONS.items():
        assert f"[{sname}]" in text
        for f in dataclasses.fields(scls):
            assert f.metadata["help"] in text
    assert "# reward.KEY = ..." in text
    assert "(one of lora, full)" in text


# -- model presets ------------------------------------------------------------------------------------


def test_default_model_presets_apply_under_user_settings(tmp_path) -> None:
    cfg = load_config()
    assert cfg.model.name == "shapes"
    assert cfg.reward.name == "shapes-clip" and cfg.sample.num_steps == 10  # offline, CPU-sized
    assert cfg.prompts.name == "shapes-demo" and cfg.sample.images_per_prompt == cfg.advantage.min_count == 8
    assert cfg.logging.watch == ["shapes-gold"] and cfg.model.train_mode == "full"
    user = load_config(None, ["sample.num_steps=7"], {"reward": {"name": "incompressibility"}})
    assert user.reward.name == "incompressibility" and user.sample.num_steps == 7
    assert user.sample.batch_size == 16  # the untouched preset still applies
    toml = tmp_path / "c.toml"
    toml.write_text('[reward]\nname = "shapes-aesthetic"\n')
    assert load_config(toml).reward.name == "shapes-aesthetic"


def test_models_without_presets_keep_the_paper_defaults() -> None:
    cfg = load_config(None, ["model.name=sd-1.5"])
    assert cfg.reward.name == "incompressibility" and cfg.sample.num_steps == 50 and cfg.run.epochs == 100


def test_model_folder_presets_from_rlbench_json(tmp_path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "rlbench.json").write_text('{"train_defaults": {"sample.num_steps": 12, "reward.name": "compressibility"}}')
    cfg = load_config(None, [f"model.name={folder}"])
    assert cfg.sample.num_steps == 12 and cfg.reward.name == "compressibility"
    (folder / "rlbench.json").write_text('{"train_defaults": {"num_steps": 12}}')
    with pytest.raises(ConfigError, match="malformed train_defaults"):
        load_config(None, [f"model.name={folder}"])
    (folder / "rlbench.json").write_text('{"train_defaults": {"sample.num_step": 12}}')
    with pytest.raises(ConfigError, match="num_steps"):  # a typo in a preset is caught like a user's
        load_config(None, [f"model.name={folder}"])


# -- one resolution: frozen, finite, devices that exist, algorithm adjustments as notices ------------------


def test_resolved_config_is_frozen_and_changes_make_a_new_one() -> None:
    cfg = load_config(values={"model": {"name": "sd-1.5"}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sample.eta = 0.5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sample = None  # type: ignore[misc]
    changed = cfg.with_changes({"sample.eta": 0.5})
    assert (changed.sample.eta, cfg.sample.eta) == (0.5, 1.0) and changed.resolved
    with pytest.raises(ConfigError, match="sample.eta must be > 0"):
        cfg.with_changes({"sample.eta": 0.0})  # re-resolved: ddpo-is refuses a deterministic policy


@pytest.mark.parametrize("override, fragment", [
    ("train.learning_rate=inf", "train.learning_rate must be a finite number"),
    ("train.learning_rate=nan", "train.learning_rate must be a finite number"),
    ("sample.guidance_scale=-inf", "sample.guidance_scale must be a finite number"),
    ("algorithm.clip_range=inf", "algorithm.clip_range must be a finite number"),
    ("sample.eta=1.5", "sample.eta must be in [0, 1]"),
    ("model.lora_alpha=0", "model.lora_alpha must be > 0"),
    ("train.adam_epsilon=0", "train.adam_epsilon must be > 0"),
    ("run.seed=-1", "run.seed must be >= 0"),
])
def test_every_number_is_finite_and_in_range(override, fragment) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert fragment in str(err.value)


def test_a_device_the_machine_lacks_is_an_error(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            load_config(overrides=[f"model.device={device}"])
    with pytest.raises(ConfigError, match="not a device"):
        load_config(overrides=["model.device=tpu"])
    with pytest.raises(ConfigError, match="fp16' needs a CUDA GPU"):
        load_config(overrides=["model.mixed_precision=fp16"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert load_config(overrides=["model.device=cuda:1"]).model.device == "cuda:1"
    with pytest.raises(ConfigError, match="has 2 GPU"):
        load_config(overrides=["model.device=cuda:2"])
    assert load_config(overrides=["model.device=cpu"]).model.device == "cpu"


def test_algorithm_adjustments_happen_in_the_resolution_and_are_notices() -> None:
    from typer.testing import CliRunner

    from rlbench.cli import app

    values = {"algorithm": {"name": "ddpo-sf"}, "sample": {"batch_size": 8, "num_batches_per_epoch": 2},
              "train": {"batch_size": 4, "gradient_accumulation_steps": 1}}
    cfg = load_config(values=values)
    assert cfg.train.gradient_accumulation_steps == 4 and cfg.updates_per_epoch == 1
    assert len(cfg.notices) == 1 and "gradient_accumulation_steps set to 4" in cfg.notices[0]
    assert "notices" not in cfg.to_toml() and tomllib.loads(cfg.to_toml())["train"]["gradient_accumulation_steps"] == 4
    out = CliRunner().invoke(app, ["config", "--set", "algorithm.name=ddpo-sf"])
    assert out.exit_code == 0 and out.output.startswith("# notice: ddpo-sf: train.gradient_accumulation_steps")


def test_training_resolves_the_config_exactly_once(monkeypatch, tmp_path) -> None:
    """The CLI resolves, the trainer reads: no second build or validation of the run's config."""
    import rlbench.config as config_module
    from rlbench.train import trainer

    calls = []
    real = config_module.resolve
    monkeypatch.setattr(config_module, "resolve", lambda *a, **k: calls.append(1) or real(*a, **k))

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr("rlbench.diffusion.policy.load_policy", stop)  # stop before any model loads
    cfg = trainer.resolve_config(values={"model": {"name": "sd-1.5"}, "run": {"out": str(tmp_path / "r")}})
    with pytest.raises(Stop):
        trainer.prepare(cfg, log=None)
    assert len(calls) == 1
