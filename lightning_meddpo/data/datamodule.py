"""PreferenceDataModule: preference files -> validated records -> tokenised pairs -> PreferenceBatch.

It gets the backbone's processor from the module (linked by the CLI), so the data layer never
imports a LightningModule. Every record is validated and encoded once in `setup`: bad records raise
(or, with skip_invalid, are counted and reported), and truncated responses are counted and logged.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_meddpo.data.collate import EncodedPair, PairEncoder, PreferenceCollator
from lightning_meddpo.data.images import load_image
from lightning_meddpo.data.records import PreferenceRecord, ReadReport, read_preference_file

log = logging.getLogger(__name__)


class PreferenceDataset(Dataset):
    """Encodes one record per item: chosen and rejected on image m, plus m' when there is one."""

    def __init__(self, records: list[PreferenceRecord], encoder: PairEncoder, corruption: Any = None, seed: int = 0):
        self.records, self.encoder, self.corruption, self.seed = records, encoder, corruption, seed
        self.epoch = 0  # set by EpochSampler; seeds on-the-fly corruption

    def __len__(self) -> int:
        return len(self.records)

    def rejected_image(self, record: PreferenceRecord, image):
        if record.rejected_image is not None:
            mprime = load_image(record.rejected_image, record_id=record.id, field_name="rejected_image")
        elif self.corruption is not None:
            from lightning_meddpo.data.images import corrupt, seed_for

            mprime, _ = corrupt(image, self.corruption, seed_for(record.id, self.epoch, self.seed))
        else:
            return None
        return mprime if mprime.size == image.size else mprime.resize(image.size)

    def __getitem__(self, index: int) -> EncodedPair:
        record = self.records[index]
        image = load_image(record.image, record_id=record.id)
        chosen, images = self.encoder.encode(record.prompt, record.chosen, image, record.id)
        rejected, _ = self.encoder.encode(record.prompt, record.rejected, image, record.id)
        mprime = self.rejected_image(record, image)
        return EncodedPair(
            id=record.id,
            chosen=chosen,
            rejected=rejected,
            images=images,
            rejected_images=self.encoder.encode_images(mprime) if mprime is not None else None,
            weight=record.weighted_score,
            image_rejected=record.pair_type == "image",
        )


class EpochSampler(torch.utils.data.Sampler):
    """A (shuffling) sampler whose set_epoch, which Lightning calls each epoch, reaches the dataset."""

    def __init__(self, dataset: PreferenceDataset, shuffle: bool, seed: int):
        self.dataset, self.shuffle, self.seed = dataset, shuffle, seed

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(len(self.dataset)))
        g = torch.Generator().manual_seed(self.seed + self.dataset.epoch)
        return iter(torch.randperm(len(self.dataset), generator=g).tolist())


class PreferenceDataModule(L.LightningDataModule):
    """Image-text preference pairs in the paper's format (JSON array or JSONL, DESIGN.md §5).

    Args:
        train_file: preference records for training.
        val_file: records for validation; if absent, `val_fraction` of train_file is split off (seeded).
        test_file: records for `test`.
        image_root: directory image paths are relative to (default: each file's directory).
        demo: generate the synthetic demo dataset into the files' directory if it is missing;
            a dict passes sizes to it (n_train, n_val, n_test, image_pair_fraction, ...).
        max_length: tokens per sequence; responses are truncated from the end, image tokens never.
        corruption: on-the-fly corruption for m' when a record has no rejected_image (e.g. "crop").
        skip_invalid: count and report invalid records instead of raising on the first.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        image_root: str | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_length: int = 2048,
        image_placeholder: str | None = None,
        corruption: str | dict | None = None,
        skip_invalid: bool = False,
        demo: bool | dict[str, Any] = False,
        seed: int = 0,
        processor: Any = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["processor"])
        self.processor = processor
        self.datasets: dict[str, PreferenceDataset] = {}
        self.reports: dict[str, ReadReport] = {}
        self.truncated: Counter = Counter()

    def prepare_data(self) -> None:
        if self.hparams.demo:
            from lightning_meddpo.data.synthetic import ensure_demo_dataset

            options = self.hparams.demo if isinstance(self.hparams.demo, dict) else {}
            ensure_demo_dataset(Path(self.hparams.train_file).parent, **{"seed": self.hparams.seed, **options})

    def _read(self, path: str) -> list[PreferenceRecord]:
        records, report = read_preference_file(path, self.hparams.image_root, skip_invalid=self.hparams.skip_invalid)
        self.reports[path] = report
        log.info("%s: %s", path, report.summary())
        for err in report.errors[:20]:
            log.warning("skipped %s", err)
        return records

    def _dataset(self, split: str, records: list[PreferenceRecord]) -> PreferenceDataset:
        if self.processor is None:
            raise ValueError("PreferenceDataModule needs the backbone's processor (the CLI links it from the model)")
        encoder = PairEncoder(self.processor, self.hparams.max_length, self.hparams.image_placeholder)
        dataset = PreferenceDataset(records, encoder, self.hparams.corruption, self.hparams.seed)
        self._check_lengths(split, dataset)
        return dataset

    def _check_lengths(self, split: str, dataset: PreferenceDataset) -> None:
        """Encode every pair once: fail early on prompts that cannot fit, count truncated responses."""
        for i, record in enumerate(dataset.records):
            pair = dataset[i]
            self.truncated[split] += int(pair.chosen.truncated) + int(pair.rejected.truncated)
        if self.truncated[split]:
            log.warning("%s: %d responses truncated to max_length=%d", split, self.truncated[split], self.hparams.max_length)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if stage in ("fit", "validate", None) and "train" not in self.datasets and h.train_file:
            train = self._read(h.train_file)
            if h.val_file:
                val = self._read(h.val_file)
            else:
                g = torch.Generator().manual_seed(h.seed)
                order = torch.randperm(len(train), generator=g).tolist()
                n_val = max(1, int(round(h.val_fraction * len(train))))
                val = [train[i] for i in order[:n_val]]
                train = [train[i] for i in order[n_val:]]
            self.datasets["train"] = self._dataset("train", train)
            self.datasets["val"] = self._dataset("val", val)
        if stage in ("test", None) and h.test_file and "test" not in self.datasets:
            self.datasets["test"] = self._dataset("test", self._read(h.test_file))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"no {split} data: set data.{split}_file in the config")
        dataset = self.datasets[split]
        batch_size = self.hparams.batch_size if split == "train" else (self.hparams.eval_batch_size or self.hparams.batch_size)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochSampler(dataset, shuffle, self.hparams.seed),
            num_workers=self.hparams.num_workers,
            collate_fn=PreferenceCollator(self.processor.tokenizer.pad_token_id),
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
