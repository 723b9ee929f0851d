"""The README's reference sections are generated from the code; these tests keep them in sync."""

from pathlib import Path

from rlbench.config import annotated_defaults
from rlbench.registry import ALGORITHMS, MODELS, PROMPTS, REWARDS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_readme_config_reference_matches_rlbench_config():
    assert annotated_defaults().rstrip() in README, "regenerate the README's config block with `rlbench config`"


def test_readme_names_every_builtin_plugin():
    for registry in (REWARDS, ALGORITHMS, MODELS, PROMPTS):
        for entry in registry.entries():
            if entry.origin.startswith("rlbench=="):
                assert f"`{entry.name}`" in README, f"README does not mention built-in {registry.kind} {entry.name!r}"


def test_readme_quick_start_commands():
    assert "make demo" in README and "make test" in README


def test_readme_shapes_suite_tables_match_the_committed_results():
    # The README's benchmark tables are copied from results/shapes/tables/ (written by `rlbench bench report
    # results/shapes` from the committed runs): a re-run that changes a number must change the README too.
    tables = Path(__file__).resolve().parents[1] / "results" / "shapes" / "tables"
    for name in ("comparison", "efficiency", "overoptimisation", "transfer"):
        md = (tables / f"{name}.md").read_text(encoding="utf-8")
        body = md.split("\n\n", 1)[1].strip()
        assert body in README, f"the README's {name} table differs from results/shapes/tables/{name}.md"
