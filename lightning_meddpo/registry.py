"""Named providers that the library looks up and that others register: backbone name schemes and data makers.

The library never imports the demo (or any add-on): a scheme such as `tiny://` or a data maker such as the
demo dataset is registered here by whoever provides it (`import lightning_meddpo.demo` registers the demo's;
the command line does that import), and looked up by name where a config uses it.
"""

from __future__ import annotations

from collections.abc import Callable

BACKBONE_SCHEMES: dict[str, Callable[[str], str]] = {}  # "tiny://" -> spec -> a model directory
DATA_MAKERS: dict[str, Callable[..., object]] = {}  # "demo" -> (files, **options) -> writes those files


def register_backbone_scheme(prefix: str, resolve: Callable[[str], str]) -> None:
    """`resolve(name)` turns a backbone name starting with `prefix` into a model directory (built on demand)."""
    BACKBONE_SCHEMES[prefix] = resolve


def backbone_scheme(name: str) -> Callable[[str], str] | None:
    """The resolver for `name`'s scheme; None for a plain path or hub id. A `<scheme>://` nobody registered is an
    error naming the known ones."""
    for prefix, resolve in BACKBONE_SCHEMES.items():
        if name.startswith(prefix):
            return resolve
    scheme, sep, _ = name.partition("://")
    if sep and "/" not in scheme and "\\" not in scheme:
        hint = " (the demo's tiny models: import lightning_meddpo.demo, as the command line does)" if scheme == "tiny" else ""
        raise ValueError(f"backbone {name}: no provider for {scheme}://{hint}; registered: {sorted(BACKBONE_SCHEMES)}")
    return None


def register_data_maker(name: str, make: Callable[..., object]) -> None:
    """`make(files, **options)` writes the data files a config names (e.g. the demo dataset)."""
    DATA_MAKERS[name] = make


def data_maker(name: str) -> Callable[..., object]:
    if name not in DATA_MAKERS:
        hint = " (import lightning_meddpo.demo, as the command line does)" if name == "demo" else ""
        raise ValueError(f"no data maker {name!r}{hint}; registered: {sorted(DATA_MAKERS)}")
    return DATA_MAKERS[name]
