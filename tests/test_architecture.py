"""The layout's rules (docs/architecture.md): no import cycles, lazy imports included, and the
arrows point down: plugins and internals never import the CLI, nets/ only serves rewards/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"rlbench": ROOT / "rlbench", "rlbench.rewards": ROOT / "rewards", "rlbench.algorithms": ROOT / "algorithms"}


def _modules() -> dict[str, Path]:
    found = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([pkg, *parts])] = path
    return found


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every rlbench module ``module`` imports, at any depth of the file (function-level included)."""
    out = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and name != "rlbench":
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_lazy_imports_included():
    assert _cycles(graph()) == []


def test_the_top_level_holds_at_most_14_modules():
    top = sorted(p.stem for p in (ROOT / "rlbench").glob("*.py") if p.stem != "__init__")
    assert len(top) <= 14, top


def test_arrows_point_down():
    g = graph()
    for mod, deps in g.items():
        if mod != "rlbench.cli":
            assert "rlbench.cli" not in deps, f"{mod} imports the CLI"
        if any(d.startswith("rlbench.nets") for d in deps):
            assert mod.startswith(("rlbench.nets", "rlbench.rewards", "rlbench.testing")), f"{mod} imports nets/"
        if mod.startswith(("rlbench.rewards", "rlbench.algorithms")):
            assert not any(d.startswith(("rlbench.train.trainer", "rlbench.eval")) for d in deps), mod
        if mod == "rlbench.testing":
            continue
        assert not any(d == "rlbench.testing" for d in deps) or mod.startswith("rlbench.testing"), \
            f"{mod} imports the test builders"


def test_docs_architecture_names_every_module_and_nothing_that_is_gone():
    import re

    doc = (ROOT / "docs" / "architecture.md").read_text()
    tree = doc.split("## The tree", 1)[1].split("##", 1)[0]
    for path in (ROOT / "rlbench").rglob("*.py"):
        rel = path.relative_to(ROOT / "rlbench")
        if rel.parts[0] == "shapes" or path.name == "__init__.py" and len(rel.parts) > 1:
            continue  # shapes/ is described as one world; subpackage __init__ files hold nothing
        assert path.name in tree, f"docs/architecture.md does not name rlbench/{rel}"
    folder = None
    for line in tree.splitlines():
        m = re.match(r"^(\s*)([\w./ ]+?\.py(?:\s+\w+\.py)*)\s", line + " ")
        head = re.match(r"^\s*(\w+)/\s", line + " ")
        if head:
            folder = head.group(1)
        if m:
            for name in m.group(2).split():
                indent = len(m.group(1))
                base = ROOT / "rlbench" if indent <= 2 else ROOT / "rlbench" / folder
                assert (base / name).is_file(), f"docs/architecture.md names {name}, which does not exist in {base}"


# Modules that define a model family or build one (the shapes world trains its own DDIM UNet; the test builders
# make schedulers): everything else reaches a scheduler only through rlbench.diffusion.
_FAMILY_OWNERS = ("rlbench.diffusion", "rlbench.shapes", "rlbench.testing")


def test_nothing_outside_diffusion_imports_a_scheduler_or_a_step_function():
    """One mechanism: training, evaluation and the algorithms sample through rlbench.diffusion's one trajectory
    loop and the policy's transition; no other module imports the DDIM or flow step functions, a diffusers
    scheduler, or reads a policy's ``.scheduler``."""
    step_modules = {"rlbench.diffusion.ddim", "rlbench.diffusion.flow"}
    g = graph()
    for mod, path in _modules().items():
        if mod.startswith(_FAMILY_OWNERS):
            continue
        assert not g[mod] & step_modules, f"{mod} imports a step function: {sorted(g[mod] & step_modules)}"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("scheduler", "timesteps", "alphas_cumprod"):
                if node.attr == "timesteps" and not (isinstance(node.value, ast.Attribute)
                                                     and node.value.attr == "scheduler"):
                    continue  # a TrainBatch's or Rollout's stored step keys
                raise AssertionError(f"{mod} line {node.lineno} reads .{node.attr} of a scheduler")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers"):
                names = [a.name for a in node.names]
                assert not any("Scheduler" in n for n in names), f"{mod} imports a diffusers scheduler: {names}"


def test_one_trajectory_loop_serves_training_evaluation_and_draft():
    g = graph()
    assert "rlbench.diffusion.trajectory" in g["rlbench.diffusion.base"]  # training rollouts (Policy.sample)
    assert "rlbench.diffusion.trajectory" in g["rlbench.eval.sampling"]  # paired evaluation + KL
    assert "rlbench.diffusion.trajectory" in g["rlbench.algorithms.draft"]  # reward backprop
