"""PreferenceDataModule: preference files -> validated records -> tokenised pairs -> PreferenceBatch.

It gets the backbone's processor from the module (linked by the CLI), so the data layer never
imports a LightningModule. Files of any format in formats.py are read (`format=`). Every record is
then validated and encoded once in `setup`: each image (and rejected image) is fully decoded (truncated
or unreadable files, images over `max_pixels`), and a prompt whose image tokens alone exceed
`max_length` is a `PromptTooLongError`. Bad records raise, naming the file, row, record id and field;
with skip_invalid they are removed, counted by reason in `dm.reports[file]` (a ReadReport) and logged.
Truncated responses are counted and logged.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_meddpo.data.collate import (
    EncodedPair,
    PairEncoder,
    PreferenceCollator,
    PromptTooLongError,
)
from lightning_meddpo.data.fingerprint import data_differences, data_files, record_key
from lightning_meddpo.data.formats import FORMATS, read_records
from lightning_meddpo.data.images import (
    DEFAULT_MAX_PIXELS,
    is_dicom,
    load_image,
    to_rgb8,
)
from lightning_meddpo.data.needs import PairNeeds
from lightning_meddpo.data.records import PreferenceRecord, ReadReport, RecordError

log = logging.getLogger(__name__)

PROMPT_TOO_LONG = "prompt with image tokens exceeds max_length"
NO_SIGNAL = "no preference signal for the formulation"
NO_SIGNAL_TRUNCATED = "no preference signal for the formulation once truncated to max_length"
WEIGHT_WARN = 100.0  # weighted_score above this is warned about


def load_record_image(record: PreferenceRecord, field_name: str = "image",
                      max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a record's image (a path or a PIL image) to 8-bit RGB; failures are RecordErrors."""
    value = getattr(record, field_name)
    label = "a PIL image" if isinstance(value, Image.Image) else str(value)
    if not isinstance(value, Image.Image) and is_dicom(value):
        raise RecordError(record.source, record.id, field_name, f"{label} is a DICOM file: DICOM is not supported; "
                          "convert it to PNG (windowed as you want the model to see it)",
                          reason=f"field {field_name}: DICOM file")
    try:
        if isinstance(value, Image.Image):
            size = value.size
        else:
            with Image.open(value) as im:
                size = im.size
    except Image.DecompressionBombError as e:
        raise RecordError(record.source, record.id, field_name, f"image {label} is refused as a decompression bomb: {e}",
                          reason=f"field {field_name}: image larger than max_pixels") from None
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise RecordError(record.source, record.id, field_name, f"cannot decode image {label}: {e}",
                          reason=f"field {field_name}: image cannot be decoded") from e
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise RecordError(record.source, record.id, field_name,
                          f"image {label} is {size[0]}x{size[1]} = {size[0] * size[1]} pixels, more than "
                          f"max_pixels={max_pixels} (raise data.max_pixels to allow it)",
                          reason=f"field {field_name}: image larger than max_pixels")
    try:
        if isinstance(value, Image.Image):
            fp = getattr(value, "fp", None)
            if isinstance(fp, io.BytesIO):  # opened from a dataset's bytes: decode a copy, so the record
                value = Image.open(io.BytesIO(fp.getvalue()))  # keeps only the encoded bytes in memory
            value.load()
            return to_rgb8(value)
        return load_image(value, record_id=record.id, field_name=field_name, max_pixels=None)
    except (OSError, SyntaxError, ValueError) as e:
        cause = e.__cause__ or e
        raise RecordError(record.source, record.id, field_name, f"cannot decode image {label}: {cause}",
                          reason=f"field {field_name}: image cannot be decoded") from e


class PreferenceDataset(Dataset):
    """Encodes one record per item, each part once: the prompt on m, the responses, and m' (the
    record's rejected_image or the on-the-fly corruption) processed as an image of its own."""

    def __init__(self, records: list[PreferenceRecord], encoder: PairEncoder, corruption: Any = None, seed: int = 0,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, needs: PairNeeds | None = None):
        self.records, self.encoder, self.corruption, self.seed = records, encoder, corruption, seed
        self.max_pixels, self.needs = max_pixels, needs
        self.epoch = 0  # set by EpochSampler; seeds on-the-fly corruption
        self.keys: list[str] | None = None  # per record: its content key (PreferenceDataModule.content_keys)

    def __len__(self) -> int:
        return len(self.records)

    def rejected_image(self, record: PreferenceRecord, image: Image.Image) -> Image.Image | None:
        """m' as it is (no resize to m's size: the processor treats it as any image), or None where there
        is none or the formulation never scores it (then it is not even opened)."""
        if self.needs is not None and not self.needs.uses_mprime(record.pair_type):
            return None
        if record.rejected_image is not None:
            return load_record_image(record, "rejected_image", self.max_pixels)
        if self.corruption is not None:
            from lightning_meddpo.data.images import corrupt, seed_for

            return corrupt(image, self.corruption, seed_for(record.id, self.epoch, self.seed))[0]
        return None

    def __getitem__(self, index: int) -> EncodedPair:
        record = self.records[index]
        image = load_record_image(record, "image", self.max_pixels)
        responses = [record.chosen] if record.desirable is not None else [record.chosen, record.rejected]
        try:
            prompt, prompt_mprime, ids, truncated = self.encoder.encode_pair(
                record.prompt, responses, image, self.rejected_image(record, image), record.id)
        except PromptTooLongError as e:
            raise PromptTooLongError(f"{record.source}: field 'prompt': {e} (raise data.max_length)") from e
        return EncodedPair(
            id=record.id,
            prompt=prompt,
            chosen=ids[0],
            rejected=ids[1] if len(ids) > 1 else None,
            prompt_mprime=prompt_mprime,
            weight=record.weighted_score,
            image_rejected=record.pair_type == "image",
            truncated=sum(truncated),
            desirable=record.desirable,
            key=self.keys[index] if self.keys is not None else None,
        )


@dataclass(frozen=True)
class ResumePoint:
    """Where a checkpoint stopped in an epoch: `batches` of `batch_size` on each of `replicas` data-parallel ranks
    (`batches=None`: to the end of the epoch: a checkpoint that cannot say, see _resume_point)."""

    epoch: int
    batches: int | None
    batch_size: int
    replicas: int

    @property
    def seen(self) -> int | None:
        """How many leading entries of the epoch's global order were trained on: rank r takes entries r, r + W, ...
        of it (DistributedSampler), so after k batches of b on W ranks exactly the first k * b * W are done."""
        return None if self.batches is None else self.batches * self.batch_size * self.replicas


class EpochSampler(DistributedSampler):
    """Shuffles per epoch, shards across data-parallel ranks, and hands the epoch to the dataset
    (it seeds on-the-fly corruption, so m' changes every epoch). Being a DistributedSampler, Lightning
    uses it as it is under DDP / FSDP instead of wrapping it, and a wrapper would swallow set_epoch.

    After a resume mid-epoch (`resume_point(epoch)`, asked once) the epoch goes on with the pairs not yet trained
    on: with the checkpoint's batch size and number of ranks, exactly the uninterrupted run's remaining batches;
    with others, the rest of the epoch's order (every remaining pair once), sharded over the ranks there are now."""

    def __init__(self, dataset: PreferenceDataset, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0,
                 batch_size: int = 1, resume_point: Callable[[int], ResumePoint | None] | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.resume_point = resume_point

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.epoch = epoch

    def __iter__(self):
        order = list(super().__iter__())
        point = self.resume_point(self.epoch) if self.resume_point is not None else None
        if point is None:
            return iter(order)
        if point.seen is None:
            return iter([])
        if (point.batch_size, point.replicas) == (self.batch_size, self.num_replicas):
            return iter(order[point.batches * point.batch_size:])
        return iter(self._remaining(point))

    def _remaining(self, point: ResumePoint) -> list[int]:
        """This rank's share of the epoch's pairs not trained on under the checkpoint's batch size and ranks."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            epoch_order = torch.randperm(n, generator=g).tolist()
        else:
            epoch_order = list(range(n))
        padded = epoch_order + epoch_order[: -n % point.replicas]  # the order the checkpoint's ranks shared
        seen = set(padded[: point.seen])
        rest = [i for i in epoch_order if i not in seen]
        rest += rest[: -len(rest) % self.num_replicas]  # as DistributedSampler pads
        return rest[self.rank :: self.num_replicas]


class ResumableLoader(DataLoader):
    """The training DataLoader. A resume mid-epoch continues in it where the run stopped: the DataModule
    restores the position (its state_dict) and the sampler leaves out the epoch's batches already trained
    on. The loader is marked stateful so Lightning does not warn that it restarts the epoch; its own
    state is empty (the position lives in the DataModule, which Lightning restores before any data is
    drawn)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        """With workers, they start at the first batch asked for, not when Lightning creates the iterator: it does so
        before it sets the sampler's epoch, and workers draw the order (and m' seeds) as they start, so a
        resume in epoch k > 0 would get epoch 0's order."""
        return super().__iter__() if self.num_workers == 0 else _StartOnFirstBatch(lambda: DataLoader.__iter__(self))


class _StartOnFirstBatch:
    """An iterator that creates the real one on its first `next`."""

    def __init__(self, start: Callable[[], Any]):
        self._start, self._iterator = start, None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._start()
        return next(self._iterator)


def default_workers(trainer: L.Trainer | None) -> int:
    """Data workers when none are configured: 0 where the CPU trains (a worker would take cores from the step) or
    outside a Trainer; else up to 4 per training process (the paper's dataloader_num_workers), the node's cores
    shared by its processes with one core each kept for the process itself."""
    from lightning.pytorch.accelerators import CPUAccelerator

    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is None or isinstance(accelerator, CPUAccelerator):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cores // max(1, getattr(trainer, "num_devices", 1)) - 1))


class PreferenceDataModule(L.LightningDataModule):
    """Image-text preference pairs (docs/design.md §5): the paper's format, TRL's (paired, or unpaired
    for KTO), or a `datasets` dataset.

    Args:
        train_file: preference records for training (a file, or a `datasets` save_to_disk directory).
        val_file: records for validation; if absent, `val_fraction` of train_file is split off (seeded).
        test_file: records for `test`.
        format: "auto" (directory: hf_dataset; file: paper, trl or kto by its fields), "paper", "trl",
            "kto" or "hf_dataset" (see data/formats.py). For a DatasetDict the split "train" / "validation" (or
            "val") / "test" is used, or the only split.
        image_root: directory image paths are relative to (default: each file's directory). Paths may not
            leave it, also not through a symbolic link.
        rejected_image_root: directory `rejected_image` paths are relative to (default: image_root); build-pairs
            writes its corrupted images beside its output and prints this setting.
        max_pixels: images with more pixels are refused (an error, or a skip with skip_invalid).
        demo: generate the synthetic demo dataset into the files' directory if it is missing;
            a dict passes sizes to it (n_train, n_val, n_test, image_pair_fraction, ...). The files must be
            the demo's own (train.json, val.json, test.json in one folder that is absent, empty or an
            earlier demo build): the demo never writes into a folder of other files.
        max_length: tokens per sequence; responses are truncated from the end, image tokens never.
        image_placeholder: what replaces `<image>` in prompts (default: the processor's image token, for Qwen-VL
            wrapped as `<|vision_start|><|image_pad|><|vision_end|>`).
        corruption: on-the-fly corruption for m' when a record has no rejected_image (e.g. "crop").
        skip_invalid: count and report invalid records instead of raising on the first. Reading and
            validation skips are counted by reason in `reports[file]` (see also `skipped`) and logged.
        shuffle: reshuffle the training pairs every epoch (seeded); false trains in file order, every epoch
            (ordered runs, side-by-side comparisons with another trainer's sequential sampler).
        num_workers: data worker processes per training process; None (the default): `default_workers`, none
            where the CPU trains, else up to 4 so that the next batches are ready while the accelerator steps.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        image_root: str | None = None,
        rejected_image_root: str | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        max_length: int = 2048,
        image_placeholder: str | None = None,
        corruption: str | dict | None = None,
        skip_invalid: bool = False,
        demo: bool | dict[str, Any] = False,
        seed: int = 0,
        processor: Any = None,
        format: str = "auto",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        shuffle: bool = True,
    ):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"data.format must be one of {FORMATS}, got {format!r}")
        self.save_hyperparameters(ignore=["processor"])
        self.processor = processor
        self.datasets: dict[str, PreferenceDataset] = {}
        self.reports: dict[str, ReadReport] = {}
        self.truncated: Counter = Counter()
        self._origin: dict[int, str] = {}  # id(record) -> the file it was read from (its report's key)
        self.needs: PairNeeds | None = None  # None: read from the trainer's module (PreferenceModule.pair_needs)
        self._files: dict[str, Any] | None = None  # the training files' identity, hashed once (fingerprint.py)
        self._resume: ResumePoint | None = None  # where the checkpoint resumed from stopped
        self._restored = False  # a checkpoint's DataModule state was loaded (or found missing)
        self.resume_anyway = False  # set by the CLI's --resume_anyway: changed data mid-epoch resumes at the next epoch

    @property
    def skipped(self) -> Counter:
        """Skipped records by reason, over every file read."""
        total: Counter = Counter()
        for report in self.reports.values():
            total.update(report.skipped)
        return total

    def prepare_data(self) -> None:
        h = self.hparams
        if h.demo:
            from lightning_meddpo.registry import data_maker

            options = h.demo if isinstance(h.demo, dict) else {}
            data_maker("demo")([h.train_file, h.val_file, h.test_file], **{"seed": h.seed, **options})

    def _read(self, path: str, split: str = "train") -> list[PreferenceRecord]:
        h = self.hparams
        hf_split = None
        if Path(path).is_dir():
            import datasets

            if (Path(path) / datasets.config.DATASETDICT_JSON_FILENAME).is_file():
                names = datasets.load_from_disk(path).keys()
                wanted = {"train": ["train"], "val": ["validation", "val", "valid"], "test": ["test"]}[split]
                hf_split = next((n for n in wanted if n in names), None)
        records, report = read_records(path, h.image_root, format=h.format, skip_invalid=h.skip_invalid, split=hf_split,
                                       rejected_image_root=h.rejected_image_root)
        self.reports[path] = report
        self._origin.update({id(r): path for r in records})
        log.info("%s: %s", path, report.summary())
        for err in report.errors[:20]:
            log.warning("skipped %s", err)
        return records

    @property
    def pair_needs(self) -> PairNeeds | None:
        """What the formulation needs from each pair: set here, or read from the trainer's module."""
        if self.needs is not None:
            return self.needs
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        return getattr(module, "pair_needs", None)

    def _dataset(self, split: str, records: list[PreferenceRecord]) -> PreferenceDataset:
        if self.processor is None:
            raise ValueError("PreferenceDataModule needs the backbone's processor (the CLI links it from the model)")
        encoder = PairEncoder(self.processor, self.hparams.max_length, self.hparams.image_placeholder)
        dataset = PreferenceDataset(records, encoder, self.hparams.corruption, self.hparams.seed, self.hparams.max_pixels,
                                    needs=self.pair_needs)
        self._validate(split, dataset)
        return dataset

    def _validate(self, split: str, dataset: PreferenceDataset) -> None:
        """Encode every pair once: images that cannot be decoded (or are over max_pixels), prompts that
        cannot fit, a missing m' the formulation scores and pairs with no preference signal for it raise,
        or with skip_invalid are removed and counted; truncated responses are counted."""
        needs = dataset.needs
        kept: list[PreferenceRecord] = []
        skipped: Counter = Counter()
        no_signal: list[RecordError] = []
        for i, record in enumerate(dataset.records):
            try:
                if needs is not None and needs.uses_mprime(record.pair_type) and record.rejected_image is None \
                        and dataset.corruption is None:
                    raise RecordError(record.source, record.id, "rejected_image",
                                      f"{needs.formulation} scores the chosen answer on a corrupted image m', and this "
                                      "record has none: give it a rejected_image or set data.corruption",
                                      reason=f"field rejected_image: missing ({needs.formulation} scores m')")
                weight_problem = needs.weight_problem(record.weighted_score) if needs is not None else None
                if weight_problem is not None:
                    raise RecordError(record.source, record.id, "weighted_score", weight_problem,
                                      reason=f"field weighted_score: missing or negative ({needs.formulation})")
                pair = dataset[i]
                problem = None if needs is None or record.desirable is not None else needs.missing_signal(
                    record.pair_type, _responses_differ(record, pair), _images_differ(pair))
                if problem is not None:
                    reason = NO_SIGNAL
                    if pair.truncated and record.chosen.strip() != record.rejected.strip():
                        problem += (f" once both are truncated to fit max_length={self.hparams.max_length} (they differ "
                                    "only after that; raise data.init_args.max_length)")
                        reason = NO_SIGNAL_TRUNCATED
                    error = RecordError(record.source, record.id, "rejected_conversations", problem, reason=reason)
                    if not self.hparams.skip_invalid:
                        no_signal.append(error)
                        continue
                    raise error
            except (RecordError, PromptTooLongError) as e:
                if not self.hparams.skip_invalid:
                    raise
                if isinstance(e, PromptTooLongError):
                    e = RecordError(record.source, record.id, "prompt", str(e), reason=PROMPT_TOO_LONG)
                report = self.reports.setdefault(self._origin.get(id(record), split), ReadReport())
                report.skip(e)
                report.read -= 1  # read, but not usable
                skipped[e.reason] += 1
                log.warning("skipped %s", e)
                continue
            kept.append(record)
            self.truncated[split] += pair.truncated
        large = [r.id for r in kept if needs is not None and needs.weight and (r.weighted_score or 0) > WEIGHT_WARN]
        if large:
            warnings.warn(f"{split}: {len(large)} weighted_score values above {WEIGHT_WARN:g} (e.g. records {large[:5]}): "
                          "clinical-relevance weights are usually in [0, 1]; such a pair dominates its batch's loss",
                          stacklevel=2)
        if no_signal:
            shown = "\n  ".join(str(e) for e in no_signal[:10])
            raise ValueError(
                f"{split}: {len(no_signal)} of {len(dataset.records)} pairs carry no preference signal for "
                f"{needs.formulation} (they would train nothing, at a constant loss); the first:\n  {shown}\n"
                "Use data that differs where the formulation compares (e.g. text-rejected pairs for DPO, image-rejected "
                "pairs for CoPO), or set data.init_args.skip_invalid=true to skip and count them."
            )
        dataset.records = kept
        if skipped:
            log.warning("%s: %d records skipped in validation: %s", split, sum(skipped.values()),
                        "; ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())))
        if not kept:
            raise ValueError(f"{split}: no usable records left ({'; '.join(f'{r.summary()} in {p}' for p, r in self.reports.items())})")
        if self.truncated[split]:
            log.warning("%s: %d responses truncated to max_length=%d", split, self.truncated[split], self.hparams.max_length)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if stage in ("fit", "validate", None) and "train" not in self.datasets and h.train_file:
            self._files = data_files(h)  # before reading: the bytes the run reads
            train = self._read(h.train_file, "train")
            if h.val_file:
                val = self._read(h.val_file, "val")
            else:
                g = torch.Generator().manual_seed(h.seed)
                order = torch.randperm(len(train), generator=g).tolist()
                n_val = max(1, int(round(h.val_fraction * len(train))))
                if n_val >= len(train):
                    raise ValueError(
                        f"{h.train_file}: {len(train)} usable record(s); with no val_file, val_fraction={h.val_fraction} "
                        f"splits off {n_val} for validation and leaves none to train on. Add records, or set "
                        "data.init_args.val_file (it may be the same file, to validate on the training pairs)")
                val = [train[i] for i in order[:n_val]]
                train = [train[i] for i in order[n_val:]]
            self.datasets["train"] = self._dataset("train", train)
            self.datasets["val"] = self._dataset("val", val)
        if stage in ("test", None) and h.test_file and "test" not in self.datasets:
            self.datasets["test"] = self._dataset("test", self._read(h.test_file, "test"))
        self.report()

    def read_counts(self) -> dict[str, float]:
        """What reading and validation did, as counts (logged to TensorBoard as data/*)."""
        counts: dict[str, float] = {
            "data/placeholders_inserted": sum(r.placeholder_inserted for r in self.reports.values()),
            "data/skipped": sum(r.n_skipped for r in self.reports.values()),
        }
        for split, dataset in self.datasets.items():
            counts[f"data/{split}/pairs"] = len(dataset)
            counts[f"data/{split}/truncated_responses"] = self.truncated[split]
        return counts

    def report(self) -> None:
        """Print what the loader read, fixed and skipped (placeholders inserted, responses truncated, records
        skipped by reason) in the run's output, once, and log the counts to the trainer's loggers."""
        lines = [f"{path}: {report.summary()}" for path, report in self.reports.items()]
        lines += [f"{split}: {len(d)} pairs" + (f", {self.truncated[split]} responses truncated to max_length="
                  f"{self.hparams.max_length} (from the end; image tokens are never cut)" if self.truncated[split] else "")
                  for split, d in self.datasets.items()]
        if lines == getattr(self, "_reported", None):
            return
        self._reported = lines
        trainer = self.trainer
        if trainer is None or trainer.is_global_zero:
            print("data: " + "\n      ".join(lines), flush=True)
        for logger in (trainer.loggers if trainer is not None else []):
            logger.log_metrics(self.read_counts(), step=0)

    def _loader(self, split: str, shuffle: bool, cls: type[DataLoader] = DataLoader,
                resume_point: Callable[[int], ResumePoint | None] | None = None,
                dataset: PreferenceDataset | None = None) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"no {split} data: set data.{split}_file in the config")
        dataset = dataset if dataset is not None else self.datasets[split]
        batch_size = self.hparams.batch_size if split == "train" else (self.hparams.eval_batch_size or self.hparams.batch_size)
        return cls(
            dataset,
            batch_size=batch_size,
            sampler=EpochSampler(dataset, shuffle, self.hparams.seed, **self._sharding(), batch_size=batch_size,
                                 resume_point=resume_point),
            num_workers=self.hparams.num_workers if self.hparams.num_workers is not None else default_workers(self.trainer),
            collate_fn=PreferenceCollator(self.processor.tokenizer.pad_token_id),
            persistent_workers=False,
        )

    # -- resuming mid-epoch: the position is part of the DataModule's checkpoint state ------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the run is in its epoch (batches trained on, of which size, over how many ranks) and what it trains
        on (the number of pairs; the files, data/fingerprint.py, which the CLI compares before a resume)."""
        if self.trainer is None:
            return {}
        if self._files is None:
            self._files = data_files(self.hparams)
        return {"epoch": self.trainer.current_epoch,
                "position": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed,
                "batch_size": self.hparams.batch_size, "replicas": self._sharding()["num_replicas"],
                "pairs": len(self.datasets["train"]) if "train" in self.datasets else None,
                "files": self._files}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; a mid-epoch resume on other training data is refused (which pairs of the epoch
        were trained on is only known for the same pairs in the same order). Evaluating a checkpoint (validate, test,
        predict) restores nothing: where its training stood does not matter, and its training data need not be there."""
        if self.trainer is not None and self.trainer.state.fn != TrainerFn.FITTING:
            return
        self._restored = True
        if not state or "position" not in state:
            return
        point = ResumePoint(int(state["epoch"]), int(state["position"]), int(state.get("batch_size", self.hparams.batch_size)),
                            int(state.get("replicas", self._sharding()["num_replicas"])))
        mid_epoch = 0 < point.seen < (state.get("pairs") or float("inf"))
        changed = self._changed_since(state) if mid_epoch else []
        if changed and not self.resume_anyway:
            raise ValueError(f"cannot resume mid-epoch {point.epoch} ({point.batches} batches trained on): the training "
                             f"data changed since the checkpoint ({'; '.join(changed)}), so which of its pairs this epoch "
                             "still owes is unknown. Resume from a checkpoint saved at an epoch boundary, start anew on "
                             "the new data, or add --resume_anyway to leave out the rest of that epoch")
        if changed:
            log.warning("--resume_anyway: the training data changed mid-epoch %d (%s): the run resumes at the next "
                        "epoch boundary, on the new data", point.epoch, "; ".join(changed))
            point = ResumePoint(point.epoch, None, point.batch_size, point.replicas)
        self._resume = point

    def _changed_since(self, state: dict[str, Any]) -> list[str]:
        pairs = len(self.datasets["train"]) if "train" in self.datasets else None
        changed = [f"{state['pairs']} -> {pairs} training pairs"] if state.get("pairs") not in (None, pairs) else []
        if state.get("files"):
            changed += data_differences(None, state["files"], dict(self.hparams))
        return changed

    def _resume_point(self, epoch: int) -> ResumePoint | None:
        """Where `epoch` resumes, once after a restore (see EpochSampler). A checkpoint without the position
        (written before it was saved) resumed mid-epoch cannot say which pairs of the epoch were trained on: the
        rest of that epoch is left out (warned), never replayed in another order."""
        point, self._resume = self._resume, None
        trainer = self.trainer
        if point is None and not self._restored and getattr(trainer, "ckpt_path", None):
            self._restored = True
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed  # restored by Lightning
            if done:
                log.warning("%s has no data position (written by an older version): the run resumes at the next "
                            "epoch boundary, leaving out the rest of epoch %d (%d batches were trained on) rather than "
                            "training some of its pairs twice", trainer.ckpt_path, epoch, done)
                return ResumePoint(epoch, None, self.hparams.batch_size, 1)
        if point is None or point.epoch != epoch or point.batches == 0:
            return None
        return point

    # -- for a precomputed reference (reference_cache.py) --------------------------------------------
    def content_keys(self) -> dict[str, list[str]]:
        """Every train and val record's content key (fingerprint.record_key: its text and its images' bytes), kept
        on the datasets so batches carry them: a precomputed reference is looked up by what a pair is, not by its
        id. Each image file is read and hashed once (streamed); the time it took is logged."""
        started = time.perf_counter()
        digests: dict[str, str] = {}
        for split in ("train", "val"):
            dataset = self.datasets.get(split)
            if dataset is not None and dataset.keys is None:
                dataset.keys = [record_key(r, digests) for r in dataset.records]
        log.info("content keys: %d records, %d image files hashed in %.2f s", sum(len(d) for d in self.datasets.values()),
                 len(digests), time.perf_counter() - started)
        return {split: list(d.keys) for split, d in self.datasets.items() if d.keys is not None}

    def reference_dataloaders(self, keys: set[str] | None = None) -> dict[str, DataLoader]:
        """Train and val in file order, sharded over data-parallel ranks, epoch 0: what a precomputed reference
        scores once; with `keys`, only the records with those content keys (what the cache does not hold)."""
        loaders = {}
        for split in ("train", "val"):
            dataset = self.datasets.get(split)
            if dataset is None:
                continue
            if keys is not None:
                kept = [i for i, k in enumerate(dataset.keys) if k in keys]
                if not kept:
                    continue
                dataset = copy.copy(dataset)
                dataset.records = [dataset.records[i] for i in kept]
                dataset.keys = [dataset.keys[i] for i in kept]
            loaders[split] = self._loader(split, shuffle=False, dataset=dataset)
        return loaders

    def reference_settings(self) -> dict[str, Any]:
        """The data settings that change how a pair is tokenised or which m' it gets (its content is in its key)."""
        return {k: self.hparams.get(k) for k in ("max_length", "image_placeholder", "corruption", "seed", "max_pixels")}

    def mprime_drawn_each_epoch(self) -> list[str]:
        """Ids of records whose m' is a fresh corruption every epoch (no rejected_image, corruption on)."""
        if self.hparams.corruption is None:
            return []
        return [r.id for split in ("train", "val") if split in self.datasets
                for r in self.datasets[split].records if r.rejected_image is None]

    def _sharding(self) -> dict[str, int]:
        """The strategy's data-parallel size and rank (what Lightning would give its own sampler)."""
        strategy = self.trainer.strategy if self.trainer is not None else None
        kwargs = getattr(strategy, "distributed_sampler_kwargs", None) or {}
        return {"num_replicas": kwargs.get("num_replicas", 1), "rank": kwargs.get("rank", 0)}

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=self.hparams.shuffle, cls=ResumableLoader, resume_point=self._resume_point)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def _responses_differ(record: PreferenceRecord, pair: EncodedPair) -> bool:
    """The responses differ in the tokens that are scored: after truncation to max_length, not only as text."""
    if record.chosen.strip() == record.rejected.strip():
        return False
    return pair.rejected is None or not torch.equal(pair.chosen, pair.rejected)


def _images_differ(pair: EncodedPair) -> bool:
    """m' was processed and its pixels differ from m's."""
    if pair.prompt_mprime is None:
        return False
    a, b = pair.prompt.image.pixel_values, pair.prompt_mprime.image.pixel_values
    return a.shape != b.shape or not torch.equal(a, b)
