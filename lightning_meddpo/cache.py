"""Where lightning_meddpo caches what it builds or computes (tiny backbones, reference log-probs):
$LIGHTNING_MEDDPO_CACHE, else ~/.cache/lightning_meddpo. A leaf module, so every layer can ask."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_MEDDPO_CACHE", Path.home() / ".cache" / "lightning_meddpo"))
