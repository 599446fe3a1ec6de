"""Records, the collator and the DataModule on real files: masking, placeholders, errors, truncation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lightning_meddpo.data.collate import (
    IGNORE_INDEX,
    PairEncoder,
    PreferenceCollator,
    PromptTooLongError,
)
from lightning_meddpo.data.datamodule import PreferenceDataModule, PreferenceDataset
from lightning_meddpo.data.records import RecordError, read_preference_file
from tests.conftest import image_token_count


def _copy_demo(demo_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the demo train file (images linked) with `edit(records)` applied."""
    records = json.loads((demo_dir / "train.json").read_text())[:6]
    edit(records)
    shutil.copytree(demo_dir / "images", tmp_path / "images")
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path


def test_prompt_holds_the_image_tokens_and_responses_are_scored_whole(demo_dir, tiny_processor):
    records, _ = read_preference_file(demo_dir / "train.json")
    encoder = PairEncoder(tiny_processor, max_length=256)
    dataset = PreferenceDataset(records[:4], encoder)
    batch = PreferenceCollator(tiny_processor.tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    image_id = tiny_processor.tokenizer.convert_tokens_to_ids("<image>")
    assert ((batch.prompt.input_ids == image_id).sum(-1) == image_token_count(tiny_processor)).all()  # every image token
    for row in range(4):
        prompt = tiny_processor.tokenizer.decode(batch.prompt.row(row)["input_ids"])
        assert prompt.endswith("ASSISTANT:") and "USER:" in prompt  # the whole prompt, never scored
        for side, record in ((batch.chosen, records[row].chosen), (batch.rejected, records[row].rejected)):
            scored = side.row(row)["input_ids"]
            assert not (scored == image_id).any()  # no image token scored
            text = tiny_processor.tokenizer.decode(scored, skip_special_tokens=False)
            assert text == " " + record + tiny_processor.tokenizer.eos_token  # exactly the response + EOS
    assert batch.rejected_images is not None and batch.weights is not None
    # the plain sequence a model sees for one view: the prompt, then the response, labels on the response
    ids, labels = encoder.encode(records[0].prompt, records[0].chosen, _img(records[0]), records[0].id)
    n = int(batch.prompt.lengths[0])
    assert torch.equal(ids, torch.cat([batch.prompt.row(0)["input_ids"], batch.chosen.row(0)["input_ids"]]))
    assert (labels[:n] == IGNORE_INDEX).all() and torch.equal(labels[n:], batch.chosen.row(0)["input_ids"])


def test_record_without_placeholder_gets_one_and_is_counted(demo_dir, tmp_path, tiny_processor):
    def drop_placeholder(records):
        for conv in ("conversations", "rejected_conversations"):
            records[0][conv][0]["value"] = records[0][conv][0]["value"].replace("<image>\n", "")

    path = _copy_demo(demo_dir, tmp_path, drop_placeholder)
    records, report = read_preference_file(path)
    assert report.placeholder_inserted == 1 and "1 had no <image> placeholder" in report.summary()
    assert records[0].prompt[0].text.startswith("<image>\n")
    pair = PreferenceDataset(records[:1], PairEncoder(tiny_processor, 256))[0]
    image_id = tiny_processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((pair.prompt.tokens["input_ids"] == image_id).sum()) == image_token_count(tiny_processor)  # the image is used


def test_missing_image_names_record_and_path(demo_dir, tmp_path):
    path = _copy_demo(demo_dir, tmp_path, lambda r: r[2].__setitem__("image", "images/nope.png"))
    with pytest.raises(RecordError) as err:
        read_preference_file(path)
    assert "synth-train-00002" in str(err.value) and "nope.png" in str(err.value) and "'image'" in str(err.value)


def test_skip_invalid_counts_instead_of_raising(demo_dir, tmp_path):
    path = _copy_demo(demo_dir, tmp_path, lambda r: r[1].pop("conversations"))
    records, report = read_preference_file(path, skip_invalid=True)
    assert len(records) == 5 and sum(report.skipped.values()) == 1 and "synth-train-00001" in report.errors[0]


def test_truncation_keeps_image_tokens_and_cuts_the_response_end(demo_dir, tiny_processor):
    records, _ = read_preference_file(demo_dir / "train.json")
    full, labels = PairEncoder(tiny_processor, 512).encode(records[0].prompt, records[0].chosen, _img(records[0]), "x")
    prompt_len = int((labels == IGNORE_INDEX).sum())
    assert full.numel() > prompt_len + 2
    cut, _ = PairEncoder(tiny_processor, prompt_len + 2).encode(records[0].prompt, records[0].chosen, _img(records[0]), "x")
    assert cut.numel() == prompt_len + 2
    assert torch.equal(cut, full[: prompt_len + 2])  # prefix kept, end of response cut
    pair = PreferenceDataset(records[:1], PairEncoder(tiny_processor, prompt_len + 2))[0]
    assert pair.truncated == 2 and pair.chosen.numel() == 2 and pair.rejected.numel() == 2  # both responses cut
    with pytest.raises(PromptTooLongError, match="record id='x'"):
        PairEncoder(tiny_processor, prompt_len).encode(records[0].prompt, records[0].chosen, _img(records[0]), "x")


def test_datamodule_counts_truncated_pairs(demo_dir, tiny_processor, caplog):
    dm = PreferenceDataModule(
        train_file=str(demo_dir / "train.json"), val_file=str(demo_dir / "val.json"),
        max_length=32, batch_size=4, processor=tiny_processor,
    )
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert dm.truncated["train"] > 0 and "truncated to max_length=32" in caplog.text
    batch = next(iter(dm.train_dataloader()))
    assert ((batch.prompt.lengths + batch.chosen.lengths) <= 32).all() and len(batch) == 4


def test_seeded_split_when_no_val_file(demo_dir, tiny_processor):
    def split():
        dm = PreferenceDataModule(train_file=str(demo_dir / "train.json"), val_fraction=0.25, processor=tiny_processor)
        dm.setup("fit")
        return [r.id for r in dm.datasets["train"].records], [r.id for r in dm.datasets["val"].records]

    train, val = split()
    assert len(val) == 12 and not set(train) & set(val) and (train, val) == split()


def _img(record):
    from lightning_meddpo.data.images import load_image

    return load_image(record.image)


def test_epoch_reaches_the_dataset_and_ranks_get_disjoint_shards(demo_dir, tmp_path, tiny_processor):
    """On-the-fly m' changes each epoch, also under DDP: the sampler is a DistributedSampler, so Lightning
    uses it as it is (a wrapper around any other sampler would swallow set_epoch)."""
    from types import SimpleNamespace

    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DistributedSampler

    def text_pairs_only(records):
        for r in records:
            r.pop("rejected_image", None)  # so m' is made on the fly

    train = _copy_demo(demo_dir, tmp_path, text_pairs_only)
    dm = PreferenceDataModule(train_file=str(train), val_file=str(demo_dir / "val.json"),
                              processor=tiny_processor, batch_size=4, corruption="crop")
    dm.setup("fit")
    shards = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank}))
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)  # what Lightning checks before wrapping
        _set_sampler_epoch(loader, 3)  # what Lightning calls each epoch
        assert dm.datasets["train"].epoch == 3
        shards.append(list(loader.sampler))
    assert len(shards[0]) == len(shards[1]) == 3 and sorted(shards[0] + shards[1]) == list(range(6))

    dataset = dm.datasets["train"]

    def mprime(epoch):
        dataset.epoch = epoch
        return dataset[0].prompt_mprime.image.pixel_values

    assert torch.equal(mprime(1), mprime(1)) and not torch.equal(mprime(1), mprime(2))


def test_single_process_shuffle_is_seeded_per_epoch(demo_dir, tiny_processor):
    dm = PreferenceDataModule(train_file=str(demo_dir / "train.json"), val_file=str(demo_dir / "val.json"),
                              processor=tiny_processor, batch_size=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    order = lambda e: (loader.sampler.set_epoch(e), list(loader.sampler))[1]  # noqa: E731
    assert order(0) == order(0) and order(0) != order(1) and sorted(order(1)) == list(range(48))
    assert list(dm.val_dataloader().sampler) == list(range(16))  # val in file order


def test_mprime_is_processed_as_its_own_image(demo_dir, tmp_path, tiny_processor):
    """m' (here a crop of another aspect ratio, as the paper's mDPO crops are) goes through the backbone's
    own resize/crop/pad exactly as any image, never first resized to m's size."""
    from PIL import Image

    from lightning_meddpo.data.images import load_image

    def wide_crop(records):
        for r in records:
            r["rejected_image"] = "wide.png"
    path = _copy_demo(demo_dir, tmp_path, wide_crop)
    crop = Image.open(demo_dir / json.loads((demo_dir / "train.json").read_text())[0]["image"]).crop((0, 8, 32, 20))
    crop.resize((96, 36)).save(tmp_path / "wide.png")
    records, _ = read_preference_file(path)
    encoder = PairEncoder(tiny_processor, 256)
    pair = PreferenceDataset(records[:1], encoder)[0]
    expected = encoder.encode_images(load_image(tmp_path / "wide.png")).pixel_values
    assert torch.equal(pair.prompt_mprime.image.pixel_values, expected)
    squashed = encoder.encode_images(load_image(tmp_path / "wide.png").resize((32, 32))).pixel_values
    assert not torch.equal(expected, squashed)  # what resizing to m's size first would have given


def test_shuffle_false_trains_in_file_order_every_epoch(demo_dir, tiny_processor):
    from lightning.fabric.utilities.data import _set_sampler_epoch

    dm = PreferenceDataModule(train_file=str(demo_dir / "train.json"), val_file=str(demo_dir / "val.json"),
                              processor=tiny_processor, batch_size=8, shuffle=False)
    dm.setup("fit")
    ids = [r.id for r in dm.datasets["train"].records]
    for epoch in (0, 1):
        loader = dm.train_dataloader()
        _set_sampler_epoch(loader, epoch)
        assert [i for batch in loader for i in batch.ids] == ids
    shuffled = PreferenceDataModule(train_file=str(demo_dir / "train.json"), val_file=str(demo_dir / "val.json"),
                                    processor=tiny_processor, batch_size=8)
    shuffled.setup("fit")
    assert [i for batch in shuffled.train_dataloader() for i in batch.ids] != ids


class _Epochs(torch.utils.data.Dataset):
    """Each item says the index and the dataset's epoch (what on-the-fly m' corruption is seeded with)."""

    epoch = 0

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, self.epoch


def test_data_workers_start_after_lightning_sets_the_epoch():
    """Lightning creates the training iterator, then sets the sampler's epoch, then asks for batches. Workers
    that started with the iterator would serve the previous epoch's order and m' seeds; ours start at the first
    batch, so they serve the epoch that was set."""
    from lightning_meddpo.data.datamodule import EpochSampler, ResumableLoader

    dataset = _Epochs()
    sampler = EpochSampler(dataset, shuffle=True, seed=0)
    loader = ResumableLoader(dataset, batch_size=8, sampler=sampler, num_workers=1)
    iterator = iter(loader)
    sampler.set_epoch(3)
    indices, epochs = next(iterator)
    assert epochs.tolist() == [3] * 8
    assert indices.tolist() == list(sampler)  # epoch 3's order
    sampler.set_epoch(0)
    assert indices.tolist() != list(sampler)


def test_default_workers_keep_the_accelerator_fed_and_leave_the_cpu_to_a_cpu_run(monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.accelerators import CPUAccelerator

    from lightning_meddpo.data.datamodule import default_workers

    gpu = object()  # any accelerator that is not the CPU
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_workers(SimpleNamespace(accelerator=CPUAccelerator(), num_devices=1)) == 0
    assert default_workers(None) == 0
    assert default_workers(SimpleNamespace(accelerator=gpu, num_devices=1)) == 4  # the paper's 4
    assert default_workers(SimpleNamespace(accelerator=gpu, num_devices=8)) == 1  # 2 cores per process, one kept
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_workers(SimpleNamespace(accelerator=gpu, num_devices=1)) == 0
    assert PreferenceDataModule(train_file="x.json").hparams.num_workers is None  # the default is this rule


def _tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a batch (nested TokenRows / EncodedImages / dicts) by its path."""
    from dataclasses import fields, is_dataclass

    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = {f.name: getattr(value, f.name) for f in fields(value)} if is_dataclass(value) else value
    if not isinstance(items, dict):
        return {}
    return {k: t for name, v in items.items() for k, t in _tensors(v, f"{prefix}.{name}").items()}


def test_a_worker_sends_the_same_batch_with_only_large_tensors_through_shared_memory(demo_dir, tiny_processor, monkeypatch):
    """A DataLoader worker hands each tensor's storage to the main process as a file descriptor fetched over a
    socket of its own (~0.3 ms each); our batches send their small tensors (token rows, lengths, flags) as bytes.
    The batches are the same as without a worker; only the tensors over the limit (pixels) arrive shared."""
    from torch.utils.data import DataLoader

    import lightning_meddpo.data.batch as batch_module

    records, _ = read_preference_file(demo_dir / "train.json")
    dataset = PreferenceDataset(records[:8], PairEncoder(tiny_processor, max_length=256))
    collate = PreferenceCollator(tiny_processor.tokenizer.pad_token_id)
    in_process = list(DataLoader(dataset, batch_size=4, collate_fn=collate))
    pixels = in_process[0].images.pixel_values
    limit = pixels.numel() * pixels.element_size() - 1  # the pixels over it, every token tensor under it
    monkeypatch.setattr(batch_module, "BY_VALUE_BYTES", limit)  # the worker is forked: it sees the limit
    from_worker = list(DataLoader(dataset, batch_size=4, collate_fn=collate, num_workers=1))
    assert len(from_worker) == len(in_process) == 2
    for ours, theirs in zip(from_worker, in_process):
        assert ours.ids == theirs.ids
        got, want = _tensors(ours), _tensors(theirs)
        assert got.keys() == want.keys() and ".prompt.input_ids" in got and ".images.pixel_values" in got
        for name, tensor in got.items():
            assert tensor.dtype == want[name].dtype and torch.equal(tensor, want[name]), name
            big = tensor.numel() * tensor.element_size() > limit
            assert tensor.is_shared() == big, name  # by value below the limit, shared memory above


def test_a_batch_pickles_with_its_values_and_shared_objects():
    """An unpaired batch's `rejected` is its `chosen` object, also after pickling; tensors that cannot be bytes
    (bf16, requiring grad) pickle as tensors."""
    import pickle

    from lightning_meddpo.data.batch import EncodedImages, PreferenceBatch, TokenRows

    rows = TokenRows(torch.tensor([[5, 6, 0]]), torch.tensor([2]), {"mm": torch.tensor([[1, 0, 0]], dtype=torch.int32)})
    batch = PreferenceBatch(ids=["a"], prompt=rows, chosen=rows, rejected=rows,
                            images=EncodedImages(torch.ones(1, 3, 2, 2, dtype=torch.bfloat16)),
                            weights=torch.tensor([0.5], requires_grad=True), desirable=torch.tensor([True]))
    back = pickle.loads(pickle.dumps(batch))
    assert back.rejected is back.chosen and back.prompt is back.chosen
    assert back.prompt.extra["mm"].dtype == torch.int32 and torch.equal(back.prompt.extra["mm"], rows.extra["mm"])
    assert back.images.pixel_values.dtype == torch.bfloat16 and back.weights.requires_grad
    assert torch.equal(back.prompt.input_ids, rows.input_ids) and back.desirable.tolist() == [True]
    back.prompt.input_ids[0, 0] = 7  # the values are its own, writable
    assert rows.input_ids[0, 0] == 5
