"""The DDPO paper's prompt sets (bundled data files + factories) and prompt-file reading edge cases.

The factories are tested directly: loading by name needs their entry points in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rlbench.errors import InputError
from rlbench.prompts import (
    PromptSet,
    a_or_an,
    everyday_objects,
    imagenet_animals,
    load_prompts,
    nouns_activities,
    read_prompt_file,
    simple_animals,
    unseen_animals,
)

FACTORIES = [imagenet_animals, nouns_activities, unseen_animals, everyday_objects]


@pytest.mark.parametrize(
    "factory, name, size",
    [
        (imagenet_animals, "imagenet-animals", 398),
        (nouns_activities, "nouns-activities", 135),
        (unseen_animals, "unseen-animals", 38),
        (everyday_objects, "everyday-objects", 50),
    ],
)
def test_factory_contract(factory, name, size) -> None:
    ps = factory()
    assert isinstance(ps, PromptSet)
    assert ps.name == name and len(ps) == size
    assert ps.description, "every set names its source"
    assert len(ps.metadata) == size and all(isinstance(m, dict) and m for m in ps.metadata)
    assert all(p == p.strip() and p and not p.startswith("#") for p in ps.prompts), "no comments, blanks or padding"
    assert len(set(ps.prompts)) == size, "no duplicates"
    prompts, metadata = ps.sample(7, np.random.default_rng(0))
    assert len(prompts) == len(metadata) == 7 and set(prompts) <= set(ps.prompts)


def test_imagenet_animals_first_and_last() -> None:
    ps = imagenet_animals()
    assert ps.prompts[0] == "tench, Tinca tinca"
    assert ps.prompts[1] == "goldfish, Carassius auratus"
    assert ps.prompts[151] == "Chihuahua"  # ddpo-pytorch's imagenet_dogs is [151:269]
    assert ps.prompts[268] == "Mexican hairless"
    assert ps.prompts[310] == "ant, emmet, pismire"
    # index 397 is the last animal class; 398 ("abacus") would be the first object
    assert ps.prompts[397] == "puffer, pufferfish, blowfish, globefish"
    assert "abacus" not in ps.prompts
    assert ps.metadata[0] == {"imagenet_class": 0} and ps.metadata[397] == {"imagenet_class": 397}


def test_imagenet_animals_are_full_class_strings() -> None:
    ps = imagenet_animals()
    assert sum("," in p for p in ps.prompts) > 200, "synonyms kept, not first lemmas"
    assert ps.prompts[319].startswith("dragonfly, darning needle, devil's darning needle")


def test_nouns_activities_grid() -> None:
    ps = nouns_activities()
    animals = simple_animals().prompts
    activities = ["washing dishes", "riding a bike", "playing chess"]
    assert ps.prompts[:3] == ["a cat washing dishes", "a cat riding a bike", "a cat playing chess"]
    assert ps.prompts[-1] == "a kangaroo playing chess"
    assert {(m["animal"], m["activity"]) for m in ps.metadata} == {(a, b) for a in animals for b in activities}
    for prompt, m in zip(ps.prompts, ps.metadata):
        assert prompt == f"{a_or_an(m['animal'])} {m['activity']}"
    assert "an ant washing dishes" in ps.prompts and "a ant washing dishes" not in ps.prompts
    assert "a dolphin riding a bike" in ps.prompts  # the paper's §6.2 example


def test_articles_of_the_45_animals() -> None:
    # inflect.engine().a gives "an" only to "ant" among the 45 (h-words here are not silent: "a horse").
    an = {noun for noun in simple_animals().prompts if a_or_an(noun).startswith("an ")}
    assert an == {"ant"}
    assert a_or_an("horse") == "a horse" and a_or_an("hedgehog") == "a hedgehog"


@pytest.mark.parametrize(
    "word, expected",
    [
        ("ant", "an ant"),
        ("elephant", "an elephant"),
        ("Elephant", "an Elephant"),
        ("octopus", "an octopus"),
        ("iguana", "an iguana"),
        ("umbrella", "an umbrella"),
        ("otter", "an otter"),
        ("hour", "an hour"),
        ("heir", "an heir"),
        ("honest man", "an honest man"),
        ("unicorn", "a unicorn"),
        ("uniform", "a uniform"),
        ("unicycle", "a unicycle"),
        ("ewe", "a ewe"),
        ("eucalyptus", "a eucalyptus"),
        ("one-eyed cat", "a one-eyed cat"),
        ("usual thing", "a usual thing"),
        ("yak", "a yak"),
        ("cat", "a cat"),
        ("  bee ", "a bee"),
    ],
)
def test_a_or_an(word, expected) -> None:
    assert a_or_an(word) == expected


def test_unseen_animals_are_held_out() -> None:
    ps = unseen_animals()
    assert ps.prompts[0] == "Elephant" and ps.prompts[-1] == "Shoebill stork"
    seen = {a.lower() for a in simple_animals().prompts}
    assert not seen & {p.lower() for p in ps.prompts}, "held-out animals must not overlap the training animals"
    # nor by head noun ("Shoebill stork" is no "stork" of the 45, but check every word anyway)
    assert not seen & {w.lower() for p in ps.prompts for w in p.split()}
    assert [m["animal"] for m in ps.metadata] == ps.prompts


def test_everyday_objects() -> None:
    ps = everyday_objects()
    assert ps.prompts[:4] == ["Toaster", "Chair", "Car", "Coffee cup"]
    assert ps.prompts[-1] == "Flower"
    seen = {a.lower() for a in simple_animals().prompts}
    assert not seen & {p.lower() for p in ps.prompts}
    assert [m["object"] for m in ps.metadata] == ps.prompts


def test_factories_return_fresh_objects() -> None:
    for factory in FACTORIES:
        a, b = factory(), factory()
        assert a is not b and a.prompts == b.prompts
        a.prompts.append("mutated")
        a.metadata[0]["x"] = 1
        assert "mutated" not in factory().prompts and "x" not in factory().metadata[0]


# -- read_prompt_file / load_prompts edge cases -----------------------------------------------------------------


def test_read_prompt_file_skips_comments_and_blanks(tmp_path) -> None:
    f = tmp_path / "mine.txt"
    f.write_text(
        "# source: somewhere\n\n  a red circle  \n   # an indented comment\n\t\n"
        "two blue squares # not a comment: '#' mid-line stays\n\n",
        encoding="utf-8",
    )
    ps = read_prompt_file(f)
    assert ps.prompts == ["a red circle", "two blue squares # not a comment: '#' mid-line stays"]
    assert ps.name == "mine" and ps.metadata == [{}, {}]


def test_read_prompt_file_crlf_and_no_final_newline(tmp_path) -> None:
    f = tmp_path / "crlf.txt"
    f.write_bytes(b"# header\r\na cat\r\n\r\na dog")
    assert read_prompt_file(f).prompts == ["a cat", "a dog"]


def test_read_prompt_file_accepts_str_and_path_and_name(tmp_path) -> None:
    # ddpo-pytorch's _load_lines raised UnboundLocalError when given a path that exists; rlbench must accept it.
    f = tmp_path / "real.txt"
    f.write_text("a cat\n", encoding="utf-8")
    assert read_prompt_file(str(f)).prompts == ["a cat"]
    assert read_prompt_file(Path(f)).prompts == ["a cat"]
    assert read_prompt_file(f, name="custom").name == "custom"


def test_load_prompts_with_a_real_file_path(tmp_path) -> None:
    f = tmp_path / "animals.txt"
    f.write_text("# my set\nan owl\na yak\n", encoding="utf-8")
    ps = load_prompts(str(f))
    assert ps.prompts == ["an owl", "a yak"] and ps.name == "animals"


@pytest.mark.parametrize("content", ["", "\n\n  \n", "# only\n# comments\n"])
def test_read_prompt_file_without_prompts_is_an_input_error(tmp_path, content) -> None:
    f = tmp_path / "empty.txt"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match="no prompts"):
        read_prompt_file(f)


def test_read_prompt_file_unreadable_is_an_input_error(tmp_path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        read_prompt_file(tmp_path / "missing.txt")
    with pytest.raises(InputError, match="cannot read"):
        read_prompt_file(tmp_path)  # a directory
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="cannot read"):
        read_prompt_file(bad)


def test_bundled_files_have_source_headers() -> None:
    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "prompts"
    for name in ["imagenet-animals.txt", "unseen-animals.txt", "everyday-objects.txt", "activities.txt"]:
        lines = (folder / name).read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("#"), name
        assert any(line.startswith("#") and "source:" in line for line in lines), name


def test_epoch_prompts_groups_images_per_prompt() -> None:
    from rlbench.train.trainer import epoch_prompts

    ps = PromptSet("p", [f"prompt {i}" for i in range(50)], [{"i": i} for i in range(50)])
    # k = 1 is the reference's draw: each batch its own i.i.d. prompts, same stream as before.
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    assert epoch_prompts(ps, rng_a, 4, 3) == [ps.sample(4, rng_b) for _ in range(3)]

    batches = epoch_prompts(ps, np.random.default_rng(1), batch_size=4, num_batches=3, images_per_prompt=6)
    assert [len(p) for p, _ in batches] == [4, 4, 4]
    prompts = [p for b, _ in batches for p in b]
    metadata = [m for _, b in batches for m in b]
    # 12 images = 2 prompts x 6 consecutive images, metadata travelling with each prompt.
    assert prompts[:6] == [prompts[0]] * 6 and prompts[6:] == [prompts[6]] * 6
    assert prompts[0] != prompts[6]  # different prompts in an epoch, as long as the set has enough
    assert all(m == {"i": int(p.split()[1])} for p, m in zip(prompts, metadata))
    metadata[0]["i"] = -1  # each image gets its own metadata dict
    assert metadata[1]["i"] != -1


def test_sample_distinct_covers_the_set_before_repeating() -> None:
    ps = PromptSet("p", ["a", "b", "c"])
    prompts, _ = ps.sample_distinct(7, np.random.default_rng(0))
    assert sorted(prompts[:3]) == sorted(prompts[3:6]) == ["a", "b", "c"] and len(prompts) == 7
