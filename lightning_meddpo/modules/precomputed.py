"""`reference: precomputed`: the starting model's log-probs, computed once before the first step and cached.

A callback (added by PreferenceModule.configure_callbacks) rather than module code, so the module stays
about the loss: before fit, validate or test it loads the cached reference log-probs of this data and
starting model (reference_cache.py), or computes them (each rank its shard; all ranks get the whole table).
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
    """What the cached log-probs depend on: the data, the starting weights, the processor, the views, the precision."""
    h = module.hparams
    return {
        "data": datamodule.reference_fingerprint(),
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
    """Load this data's and starting model's reference log-probs from the cache, or compute them now."""
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
    key = fingerprint(reference_fingerprint(module, dm))
    cache_dir = module.hparams.reference_cache_dir
    path = (Path(cache_dir) if cache_dir else default_cache_dir() / "reference_logps") / f"{key}.json"
    if path.is_file():
        module.policy.reference_table = ReferenceTable.load(path)
        log.info("reference log-probs: %d records from %s", len(module.policy.reference_table), path)
        return
    if trainer.global_step > 0 or trainer.ckpt_path:
        raise ValueError(f"reference: precomputed: no cached reference log-probs for this data and starting model "
                         f"({path} is missing), and they cannot be computed from trained weights: start the run "
                         "anew, or use reference: copy")
    module.policy.reference_table = compute_reference_table(trainer, module, dm, path)


def compute_reference_table(trainer, module, dm, path: Path) -> ReferenceTable:
    """The starting model's log-probs of every record of every split (each rank its shard, then gathered),
    under the training steps' autocast; written to `path` by rank 0."""
    from tqdm.auto import tqdm

    views = tuple(module.reference_views)
    table = ReferenceTable(views)
    for split, loader in dm.reference_dataloaders().items():
        for batch in tqdm(loader, desc=f"reference log-probs ({split})", disable=trainer.global_rank != 0):
            batch = trainer.strategy.batch_to_device(batch)
            if any(v.endswith("_mprime") for v in views):
                batch = batch.with_stand_in_mprime()  # a batch of text pairs only (targeted mix): m as m'
            with trainer.precision_plugin.forward_context():
                table.add(batch.ids, module.policy.starting_logps(batch, views))
    if trainer.world_size > 1:
        import torch.distributed as dist

        parts: list = [None] * trainer.world_size
        dist.all_gather_object(parts, table.values)
        for values in parts:
            table.merge(ReferenceTable(views, values))
    if trainer.global_rank == 0:
        with writing(path, "the reference log-probs"):  # a full disk: one line naming the cache file
            table.save(path, {"views": list(views)})
        log.info("reference log-probs: %d records computed, cached in %s", len(table), path)
    return table
