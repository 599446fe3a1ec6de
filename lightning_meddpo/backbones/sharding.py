"""FSDP2 for the policy: which modules become units, and the root that scoring runs inside.

The policy calls a model's parts itself (image encoder, text model, LM head), never the model's forward; FSDP2
assumes the opposite. `shard_units` and `ShardedRoot` reconcile the two (see their docstrings); the layer classes
come from the family's adapter.
"""

from __future__ import annotations

from torch import nn

from lightning_meddpo.backbones.adapter import adapter_for


def is_sharded(module: nn.Module) -> bool:
    """FSDP2 sharded weights (DTensor): every call of the module gathers them."""
    return any(hasattr(p, "full_tensor") for p in module.parameters(recurse=False))


def shard_units(model: nn.Module, layers: list[nn.Module] | None = None) -> list[nn.Module]:
    """The parameter-owning sub-modules outside the layers, each to be an FSDP2 unit of its own.

    The policy calls parts of the model on their own (image encoder, embeddings, text model, LM head),
    so no weight may be left to the root unit, which gathers only in the root's forward: every
    outermost module that owns parameters directly becomes a unit, and a call to it gathers its weights.
    Units sit below the model classes (a CLIP tower's embeddings and layer norms, not the tower), whose
    output recording transformers keys on the class. Tied input and output embeddings cannot be split
    across units: then none is returned (the policy uses the model's own forward)."""
    adapter = adapter_for(model)
    core, head = adapter.core(model), adapter.lm_head(model)
    if core is None or head is None or head.weight is core.get_input_embeddings().weight:
        return []
    inside = {id(m) for layer in (layers or []) for m in layer.modules()}
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if id(module) in inside:
            return
        if any(True for _ in module.parameters(recurse=False)):
            units.append(module)
            return
        for child in module.children():
            visit(child)

    for child in model.children():
        visit(child)
    return units


def fully_shard_model(model: nn.Module, mesh, **kwargs) -> int:
    """`fully_shard` each decoder / vision encoder layer, then the other parameter-owning parts (see
    `shard_units`), then the root; returns the number of layers."""
    from torch.distributed.fsdp import fully_shard

    classes = adapter_for(model).layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise ValueError(f"FSDP2: no layers of {sorted(classes)} in {type(model).__name__}; cannot shard it per layer")
    for layer in layers:
        fully_shard(layer, mesh=mesh, **kwargs)
    for unit in shard_units(model, layers):
        fully_shard(unit, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return len(layers)


class ShardedRoot(nn.Module):
    """The FSDP2 root of a sharded model whose parts the policy calls itself: `root(fn, *args)` runs `fn(*args)`
    inside the root's forward.

    FSDP2 takes the first unit whose forward runs as the root of the units below it, and a root keeps its weights
    gathered after its forward (for the backward that follows at once). Scoring calls the image encoder, the text
    model and the LM head, never the model's forward: each part became a root of its own and the whole model stayed
    gathered through the forward (measured: one extra full copy of the weights on every rank; on one H200 87.9 GiB
    against 59.5 GiB unsharded for LLaVA-Med 7B with LoRA). Run inside this module's forward, every part is a unit
    below one root and reshards after its own forward, as fully_shard's docs ask ("running forward through the
    root module first"). It is kept out of the module tree (the model's weights stay under their own names)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def around(cls, model: nn.Module, mesh, **kwargs) -> ShardedRoot:
        from torch.distributed.fsdp import fully_shard

        return fully_shard(cls(model), mesh=mesh, **kwargs)

    def forward(self, fn, *args):
        return fn(*args)
