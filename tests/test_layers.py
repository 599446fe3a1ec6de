"""Imports run one way: every module's imports (top-level and inside functions) point to its own layer or a
lower one, never up, never sideways into another package of the same layer.

    0 leaves      modules that import nothing of ours: text, cache, llm, checkpoints, reference_cache,
                  strategies, losses (pure), logps, registry (what add-ons register), backbones.templates,
                  backbones.qwen (the Qwen-VL processor)
    1 families    backbones.adapter and one adapter per backbone family (backbones.llava, backbones.qwen_vl):
                  what a family's model looks like, without loading one
    2 data        data.* (records, images, formats, batch, rows, collate, needs, lexicon, the DataModule)
    3 backbones   backbones.loader (checkpoints, registered schemes), backbones.build (LoRA, freezing, weights),
                  backbones.sharding (FSDP2 units and root)
    4 policy      policy (scoring pairs with a model)  |  eval (generation, metrics, judge, error analysis,
                                                       |  the eval DataModule): beside policy, never up
    5 modules     modules.*, callbacks (the LightningModules and what trains them)  |  plan (the memory a
                  configuration needs, from the policy's rows): beside modules
    6 commands    commands.* (build-pairs, convert, export, benchmark, report, plan): the programs
    7 demo        demo.* (the synthetic dataset and the tiny backbones): an add-on that registers itself
                  (registry.py); the library never imports it
    8 cli         cli (LightningCLI and the programs, one jsonargparse parser), entry (the light programs
                  without Lightning, and the import that registers the demo), __main__

So data never reads eval or a model, eval never reads modules or policy, losses read nothing of ours, no
library module reaches a command, and only the command line imports the demo.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_meddpo"

ENTRY = {"cli", "entry", "__main__"}
LEAVES = {"text", "cache", "llm", "checkpoints", "reference_cache", "strategies", "losses", "logps", "registry", "attention",
          "__init__", "backbones.templates", "backbones.qwen"}
FAMILIES = {"backbones.adapter", "backbones.llava", "backbones.qwen_vl"}
RANKS = {"data": 2, "backbones": 3, "policy": 4, "eval": 4, "modules": 5, "callbacks": 5, "plan": 5,
         "commands": 6, "demo": 7}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)


def layer(module: str) -> tuple[int, str]:
    """(rank, group): the group is the package (data, eval, ...) or the module itself for top-level ones."""
    if module in ENTRY:
        return 8, "cli"
    if module in LEAVES:
        return 0, module
    if module in FAMILIES:
        return 1, "families"
    group = module.split(".")[0]
    return RANKS[group], group


def imports(path: Path) -> set[str]:
    """The package modules `path` imports, relative imports resolved (they are refused: absolute only)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; write lightning_meddpo.<...>")
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
            if target_rank > rank or (target_rank == rank and target_group != group):
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
    (fake / "eval" / "relative.py").write_text("from .metrics import tokens\n")
    with pytest.raises(AssertionError, match="relative import"):
        violations(fake)
    (fake / "eval" / "relative.py").unlink()
    assert violations(fake) == ["data.bad (data, layer 2) imports eval.metrics (eval, layer 4)",
                                "eval.bad (eval, layer 4) imports policy (policy, layer 4)"]
