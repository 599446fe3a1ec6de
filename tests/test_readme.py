"""The README's commands run as written (on the tiny model, in a folder laid out as they expect)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

from tests.conftest import REPO


def readme_commands(first_words: str) -> list[list[str]]:
    """The README's indented command blocks starting with `first_words`, continuation lines joined."""
    lines = (REPO / "README.md").read_text().splitlines()
    commands = []
    for i, line in enumerate(lines):
        if line.strip().startswith(first_words) and line.startswith("    "):
            text = line.strip()
            j = i
            while text.endswith("\\"):
                j += 1
                text = text[:-1] + " " + lines[j].strip()
            commands.append(shlex.split(text))
    return commands


def test_build_pairs_then_fit_the_targeted_mix(tmp_path, demo_dir):
    """`build-pairs --mode both` then `fit` of the demo backbone with the targeted method on its output (text pairs
    without an m' beside image pairs) trains, as the README says."""
    shutil.copytree(demo_dir / "images", tmp_path / "images")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    questions = [json.loads(line) for line in (demo_dir / "vqa_test.jsonl").read_text().splitlines()]
    rows = [{**q, "image": q["image"].removeprefix("images/")} for q in questions]
    (tmp_path / "vqa_rad_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build, fit = readme_commands("python -m lightning_meddpo build-pairs")[0], readme_commands(
        "python -m lightning_meddpo fit --config configs/formulations/targeted.yaml --config configs/backbones/demo.yaml")[0]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for command in (build, fit):
        proc = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-4000:])
    pairs = json.loads((tmp_path / "pairs" / "pairs.json").read_text())
    assert {p["pair_type"] for p in pairs} == {"text", "image"}
    assert not (tmp_path / "images" / "rejected_images").exists()  # the source images were only read
    assert list((tmp_path / "runs").glob("**/checkpoints/last.ckpt"))


def _layout_block() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Layout")
    end = text.index("\n## ", start + 1) if "\n## " in text[start + 1:] else len(text)
    return text[start:end]


def test_readme_links_no_file_outside_the_repository():
    import re

    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)", text)
    local = [t for t in targets if not re.match(r"^[a-z]+://", t)]
    assert local, "the README links its design notes"
    for target in local:
        assert not target.startswith(("/", "..")), f"README links {target}, outside the repository"
        assert (REPO / target).exists(), f"README links {target}, which does not exist"
    assert "../" not in re.sub(r"\.\./\.\.\.", "", text.replace(".../", "")), "README names a path outside the repository"


def test_readme_layout_names_files_that_exist():
    """Every module or folder the Layout section names is in the tree (a renamed file fails this)."""
    import re

    block = _layout_block()
    names = set(re.findall(r"\b([a-z_]+(?:/[a-z_]+)*(?:\.py|/))(?![a-z])", block))
    assert "backbones/adapter.py" in block and "docs/design.md" in block
    missing = []
    for name in names:
        candidates = [REPO / name, REPO / "lightning_meddpo" / name, REPO / "lightning_meddpo" / "backbones" / name,
                      REPO / "lightning_meddpo" / "modules" / name,
                      REPO / "configs" / name.removeprefix("configs/")]
        if not any(c.exists() for c in candidates):
            missing.append(name)
    assert not missing, f"the README's Layout names {sorted(missing)}, not in the tree"
