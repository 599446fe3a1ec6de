"""Imports run one way: every module's imports (top-level and inside functions) point to its own layer or a
lower one, never up, never sideways into another package of the same layer.

    0 leaves      text, cache, llm, checkpoints, reference_cache, strategies, losses (pure: no package import)
    1 data        data.* (records, images, formats, batch, collate, needs, lexicon, the demo's synthetic data,
                  the DataModule)
    2 backbones   backbones.* (loading, templates, the tiny demo backbones, which train on the demo corpus)
    3 policy      policy (scoring pairs with a model)       | eval (generation, metrics, judge, error analysis,
                                                            |   the eval DataModule): beside policy, never up
    4 modules     modules.*, callbacks (the LightningModules and what trains them)
    5 commands    cli, lightning_cli, __main__, export, backbones.convert, data.pairs + data.rewriter
                  (build-pairs), eval.benchmark + eval.report (the grid runner and its tables)

So data never reads eval or a model, eval never reads modules or policy, losses read nothing of ours, and
no library module reaches a command.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_meddpo"

COMMANDS = {"cli", "lightning_cli", "__main__", "export", "backbones.convert", "data.pairs", "data.rewriter",
            "eval.benchmark", "eval.report"}
LEAVES = {"text", "cache", "llm", "checkpoints", "reference_cache", "strategies", "losses", "__init__"}
RANKS = {"data": 1, "backbones": 2, "policy": 3, "eval": 3, "modules": 4, "callbacks": 4}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)


def layer(module: str) -> tuple[int, str]:
    """(rank, group): the group is the package (data, eval, ...) or the module itself for top-level ones."""
    if module in COMMANDS:
        return 5, "commands"
    if module in LEAVES:
        return 0, module
    group = module.split(".")[0]
    return RANKS[group], group


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        found |= {n.removeprefix("lightning_meddpo.") for n in names if n.startswith("lightning_meddpo.")}
    return found


def violations(package: Path = PACKAGE) -> list[str]:
    wrong = []
    for path in sorted(package.rglob("*.py")):
        source = module_name(path, package)
        rank, group = layer(source)
        for target in sorted(imports(path)):
            target_rank, target_group = layer(target)
            if target_rank > rank or (target_rank == rank and target_group != group and rank != 5):
                wrong.append(f"{source} ({group}, layer {rank}) imports {target} ({target_group}, layer {target_rank})")
    return wrong


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer(module_name(path))  # KeyError: a new top-level module must be placed in the map above


def test_imports_run_one_way():
    wrong = violations()
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_losses_are_pure():
    assert not imports(PACKAGE / "losses.py")


def test_the_check_reports_upward_and_sideways_imports(tmp_path):
    fake = tmp_path / "lightning_meddpo"
    for folder in ("data", "eval"):
        (fake / folder).mkdir(parents=True)
    (fake / "data" / "bad.py").write_text("from lightning_meddpo.eval.metrics import tokens\n")
    (fake / "eval" / "bad.py").write_text("def f():\n    import lightning_meddpo.policy\n")
    assert violations(fake) == ["data.bad (data, layer 1) imports eval.metrics (eval, layer 3)",
                                "eval.bad (eval, layer 3) imports policy (policy, layer 3)"]
