"""The demo: synthetic medical images with preference pairs and held-out questions (synthetic.py), and
the tiny backbones whose tokenizers are trained on their corpus (tiny.py, tiny_qwen.py).

Importing the package registers what the demo provides (registry.py), as any add-on would: the `tiny://` backbones
and the `demo` data maker. The library never imports the demo; the command line (entry.py) and the tests do.
Registering is cheap: the builders are imported when a name is first resolved.
"""

from lightning_meddpo.registry import register_backbone_scheme, register_data_maker

TINY_SCHEME = "tiny://"
TINY_QWEN = ("qwen2_vl", "qwen2_5_vl")


def resolve_tiny_backbone(spec: str) -> str:
    """`tiny://llama|mistral|qwen2` (LLaVA) or `tiny://qwen2_vl|qwen2_5_vl`: built once into the cache."""
    name = spec.removeprefix(TINY_SCHEME)
    if name in TINY_QWEN:
        from lightning_meddpo.demo.tiny_qwen import resolve_tiny_qwen

        return str(resolve_tiny_qwen(name))
    from lightning_meddpo.demo.tiny import resolve_tiny

    return str(resolve_tiny(spec))


def make_demo_files(files, **options):
    from lightning_meddpo.demo.synthetic import demo_for_files

    return demo_for_files(files, **options)


register_backbone_scheme(TINY_SCHEME, resolve_tiny_backbone)
register_data_maker("demo", make_demo_files)
