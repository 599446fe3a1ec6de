"""`reference: precomputed`: the starting model's log-probs, computed once before the first step and cached.

A callback (added by PreferenceModule.configure_callbacks) rather than module code, so the module stays
about the loss: before fit, validate or test it loads the cached reference log-probs of this starting model
(reference_cache.py) and computes those of the pairs the cache does not hold (each rank its shard; all ranks get
the whole table).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from lightning_meddpo.backbones.loader import resolve_backbone
from lightning_meddpo.cache import default_cache_dir
from lightning_meddpo.checkpoints import writing
from lightning_meddpo.reference_cache import (
    ReferenceTable,
    fingerprint,
    processor_fingerprint,
    weights_fingerprint,
)

log = logging.getLogger(__name__)


def reference_fingerprint(module, datamodule) -> dict:
    """What names the cache file: the starting weights, the processor, the data settings that change tokenisation,
    the views, the precision. The pairs themselves are keyed inside it by content (reference_cache.py)."""
    h = module.hparams
    return {
        "data": datamodule.reference_settings(),
        "weights": [weights_fingerprint(resolve_backbone(h.backbone)), weights_fingerprint(h.init_from) if h.init_from else None],
        "processor": processor_fingerprint(module.processor),
        "views": sorted(module.reference_views),
        "precision": str(module.trainer.precision),
    }


class PrecomputedReference(L.Callback):
    """Fills `module.policy.reference_table` before fit, validate and test (see module docstring)."""

    def on_fit_start(self, trainer, module) -> None:
        ensure_reference_table(trainer, module)

    def on_validation_start(self, trainer, module) -> None:
        ensure_reference_table(trainer, module)

    def on_test_start(self, trainer, module) -> None:
        ensure_reference_table(trainer, module)


def ensure_reference_table(trainer, module) -> None:
    """The reference log-probs of every pair of this data: read from this starting model's cache file, the pairs it
    does not hold (new or changed ones) computed now and added to it."""
    if module.reference_strategy != "precomputed" or module.policy.reference_table is not None:
        return
    dm = getattr(trainer, "datamodule", None)
    if dm is None or not hasattr(dm, "reference_dataloaders"):
        return  # generation-based evaluation: no preference pairs, no reference
    if type(trainer.strategy).__name__ == "FSDPStrategy":
        raise ValueError("reference: precomputed runs the model outside the training step, which FSDPStrategy's "
                         "flat parameters do not allow: use FSDP2 (configs/strategies/fsdp2.yaml) or reference: copy")
    drawn = dm.mprime_drawn_each_epoch()
    if drawn and any(v.endswith("_mprime") for v in module.reference_views):
        raise ValueError(f"reference: precomputed needs a fixed m', but records {drawn[:5]} get a new corruption "
                         "every epoch (data.corruption, no rejected_image): write m' to files (build-pairs "
                         "--mode image) or use reference: copy")
    keys = {k for split_keys in dm.content_keys().values() for k in split_keys}
    cache_dir = module.hparams.reference_cache_dir
    path = (Path(cache_dir) if cache_dir else default_cache_dir() / "reference_logps") / f"{fingerprint(reference_fingerprint(module, dm))}.json"
    resumed = trainer.global_step > 0 or bool(trainer.ckpt_path)
    table = read_table(path, tuple(module.reference_views), can_rebuild=not resumed)
    missing = table.missing(keys)
    if missing and resumed:
        raise ValueError(f"reference: precomputed: {path} has no reference log-probs for {len(missing)} of the "
                         f"{len(keys)} pairs of this data{' (the file is missing)' if not path.exists() else ''}, and "
                         "they cannot be computed from trained weights: start the run anew, or use reference: copy")
    if missing:
        computed = compute_reference_table(trainer, module, dm, missing)
        table.merge(computed)
        if trainer.global_rank == 0:
            with writing(path, "the reference log-probs"):  # a full disk: one line naming the cache file
                table.save(path, {"views": list(table.views)})
    log.info("reference log-probs: %d pairs from %s, %d computed", len(keys) - len(missing), path, len(missing))
    module.policy.reference_table = table


def read_table(path: Path, views: tuple[str, ...], can_rebuild: bool) -> ReferenceTable:
    """The cache file's table (empty if there is none). A file that cannot be read (cut short by a full disk,
    edited) is rebuilt with a one-line warning, or, where it cannot be (a resumed run), a one-line error."""
    if not path.exists():
        return ReferenceTable(views)
    try:
        table = ReferenceTable.load(path)
        if set(table.views) != set(views):
            raise ValueError(f"it holds the views {list(table.views)}, not {list(views)}")
    except (ValueError, KeyError, TypeError, OSError) as e:
        problem = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        if not can_rebuild:
            raise ValueError(f"reference: precomputed: the cache file {path} cannot be read ({problem}), and it cannot be "
                             "rebuilt from trained weights: delete it and start the run anew, or use reference: copy") from None
        log.warning("reference: precomputed: the cache file %s cannot be read (%s); rebuilding it", path, problem)
        return ReferenceTable(views)
    return table


def compute_reference_table(trainer, module, dm, keys: set[str]) -> ReferenceTable:
    """The starting model's log-probs of the pairs with these content keys (each rank its shard, then gathered),
    under the training steps' autocast."""
    from tqdm.auto import tqdm

    views = tuple(module.reference_views)
    table = ReferenceTable(views)
    for split, loader in dm.reference_dataloaders(keys).items():
        for batch in tqdm(loader, desc=f"reference log-probs ({split})", disable=trainer.global_rank != 0):
            batch = trainer.strategy.batch_to_device(batch)
            if any(v.endswith("_mprime") for v in views):
                batch = batch.with_stand_in_mprime()  # a batch of text pairs only (targeted mix): m as m'
            with trainer.precision_plugin.forward_context():
                table.add(batch.keys, module.policy.starting_logps(batch, views))
    if trainer.world_size > 1:
        import torch.distributed as dist

        parts: list = [None] * trainer.world_size
        dist.all_gather_object(parts, table.values)
        for values in parts:
            table.merge(ReferenceTable(views, values))
    return table
