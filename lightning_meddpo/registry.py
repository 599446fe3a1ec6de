"""Named providers that the library looks up and that others register: backbone name schemes and data makers.

The library never imports the demo (or any add-on) by name: a scheme such as `tiny://` or a data maker such as
the demo dataset is registered here by whoever provides it, and looked up by name where a config uses it. An
add-on registers when imported; installed add-ons are imported on the first lookup that misses (the entry points
of group `lightning_meddpo.plugins`, pyproject.toml: the demo is one), so any process finds them: the command
line, a DataLoader worker, a Slurm job that unpickles a function.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

BACKBONE_SCHEMES: dict[str, Callable[[str], str]] = {}  # "tiny://" -> spec -> a model directory
DATA_MAKERS: dict[str, Callable[..., object]] = {}  # "demo" -> (files, **options) -> writes those files


PLUGIN_GROUP = "lightning_meddpo.plugins"


@cache
def load_plugins() -> tuple[str, ...]:
    """Import every installed add-on (once); each registers what it provides. Returns their names."""
    from importlib.metadata import entry_points

    plugins = entry_points(group=PLUGIN_GROUP)
    for plugin in plugins:
        plugin.load()
    return tuple(p.name for p in plugins)


def register_backbone_scheme(prefix: str, resolve: Callable[[str], str]) -> None:
    """`resolve(name)` turns a backbone name starting with `prefix` into a model directory (built on demand)."""
    BACKBONE_SCHEMES[prefix] = resolve


def backbone_scheme(name: str) -> Callable[[str], str] | None:
    """The resolver for `name`'s scheme; None for a plain path or hub id. A `<scheme>://` nobody registered is an
    error naming the known ones."""
    scheme, sep, _ = name.partition("://")
    if not (sep and "/" not in scheme and "\\" not in scheme):
        return None
    if not any(name.startswith(prefix) for prefix in BACKBONE_SCHEMES):
        load_plugins()
    for prefix, resolve in BACKBONE_SCHEMES.items():
        if name.startswith(prefix):
            return resolve
    hint = " (the demo's tiny models: pip install -e . registers them, or import lightning_meddpo.demo)" if scheme == "tiny" else ""
    raise ValueError(f"backbone {name}: no provider for {scheme}://{hint}; registered: {sorted(BACKBONE_SCHEMES)}")


def register_data_maker(name: str, make: Callable[..., object]) -> None:
    """`make(files, **options)` writes the data files a config names (e.g. the demo dataset)."""
    DATA_MAKERS[name] = make


def data_maker(name: str) -> Callable[..., object]:
    if name not in DATA_MAKERS:
        load_plugins()
    if name not in DATA_MAKERS:
        hint = " (pip install -e . registers the demo's, or import lightning_meddpo.demo)" if name == "demo" else ""
        raise ValueError(f"no data maker {name!r}{hint}; registered: {sorted(DATA_MAKERS)}")
    return DATA_MAKERS[name]
