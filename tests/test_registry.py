"""Add-ons register what they provide (registry.py); the library looks names up and never imports the demo by name.
A process that never imported the demo (a Slurm job unpickling a function, say) still finds it: installed add-ons
are loaded on the first lookup that misses (entry points of group lightning_meddpo.plugins)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lightning_meddpo.registry import backbone_scheme
from tests.conftest import REPO


def test_a_fresh_process_finds_the_installed_demo_without_importing_it():
    code = ("import sys; from lightning_meddpo.registry import backbone_scheme, data_maker; "
            "assert 'lightning_meddpo.demo' not in sys.modules; "
            "print(data_maker('demo').__module__, backbone_scheme('tiny://llama').__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["lightning_meddpo.demo", "lightning_meddpo.demo"]


def test_names_without_a_provider():
    assert backbone_scheme("org/model") is None and backbone_scheme("./models/x") is None  # paths and hub ids
    with pytest.raises(ValueError, match=r"backbone nope://x: no provider for nope://; registered: \['tiny://'\]"):
        backbone_scheme("nope://x")
