"""KTO on unpaired data (TRL's format: prompt, completion, label, images): reading, batching, the loss."""

from __future__ import annotations

import json
import shutil

import lightning as L
import pytest
import torch

from lightning_meddpo.callbacks import ResumableCheckpoint
from lightning_meddpo.data.datamodule import PreferenceDataModule
from lightning_meddpo.data.formats import detect_format, read_records
from lightning_meddpo.data.records import RecordError
from lightning_meddpo.modules import DPO, KTO

LABELS = [True, False, False, True, True, False, False, False]


def kto_rows(demo_dir, labels=LABELS):
    """Unpaired rows from demo pairs: a desirable row gets the pair's chosen answer, an undesirable one its rejected."""
    pairs = json.loads((demo_dir / "val.json").read_text())
    rows = []
    for pair, label in zip(pairs, labels):
        side = "conversations" if label else "rejected_conversations"
        rows.append({"id": pair["id"], "prompt": pair["conversations"][0]["value"], "completion": pair[side][-1]["value"],
                     "label": label, "images": [pair["image"]]})
    return rows


def write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def kto_file(demo_dir, tmp_path):
    shutil.copytree(demo_dir / "images", tmp_path / "images")
    return write(tmp_path / "kto.jsonl", kto_rows(demo_dir))


def test_unpaired_rows_read_as_records_with_a_label(kto_file):
    assert detect_format(kto_file) == "kto"
    records, report = read_records(kto_file)
    assert report.read == 8 and [r.desirable for r in records] == LABELS
    assert all(r.rejected == "" and r.chosen.strip() for r in records)


@pytest.mark.parametrize("edit, field, message", [
    ({"label": "yes"}, "label", "expected true"),
    ({"label": None}, "label", "missing"),
    ({"completion": " "}, "completion", "empty"),
    ({"images": []}, "images", "0 images"),
])
def test_bad_unpaired_rows_name_the_record_and_field(kto_file, edit, field, message):
    rows = [json.loads(line) for line in kto_file.read_text().splitlines()]
    rows[2].update(edit)
    write(kto_file, rows)
    with pytest.raises(RecordError) as e:
        read_records(kto_file)
    assert e.value.field_name == field and f"{kto_file}:3" in str(e.value) and rows[2]["id"] in str(e.value)
    assert message in str(e.value)


@pytest.fixture
def unpaired_batch(kto_file, tiny_processor):
    dm = PreferenceDataModule(train_file=str(kto_file), val_file=str(kto_file), processor=tiny_processor,
                              batch_size=8, max_length=128)
    dm.setup("fit")
    return next(iter(dm.val_dataloader()))


def test_unpaired_batch_carries_the_labels(unpaired_batch):
    assert unpaired_batch.desirable.tolist() == LABELS
    assert unpaired_batch.rejected is unpaired_batch.chosen  # one completion per example, encoded once


def test_unpaired_kto_loss_by_hand(unpaired_batch):
    module = KTO(backbone="tiny://llama", beta=0.5, desirable_weight=1.0, undesirable_weight=3.0)
    module.configure_model()
    # policy = reference: h = 0 and z_0 = 0, so each example costs weight * (1 - sigma(0)) = weight / 2
    loss, metrics = module.compute_loss(unpaired_batch)
    n_desirable = sum(LABELS)
    expected = (n_desirable * 0.5 + (len(LABELS) - n_desirable) * 1.5) / len(LABELS)
    assert loss.item() == pytest.approx(expected, abs=1e-5) and metrics["kl"].item() == pytest.approx(0.0, abs=1e-5)

    with torch.no_grad():  # move the policy: the loss follows the published form per example
        for p in module.policy.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    loss, metrics = module.compute_loss(unpaired_batch)
    with torch.no_grad():
        h = module.policy.logps(unpaired_batch, ("chosen",))["chosen"] - module.policy.reference_logps(unpaired_batch, ("chosen",))["chosen"]
    z0, d = metrics["kl"], unpaired_batch.desirable
    by_hand = torch.where(d, 1.0 * (1 - torch.sigmoid(0.5 * (h - z0))), 3.0 * (1 - torch.sigmoid(0.5 * (z0 - h))))
    assert torch.allclose(metrics["loss/kto"], by_hand, atol=1e-5) and torch.isclose(loss, by_hand.mean(), atol=1e-5)
    assert torch.isclose(metrics["rewards/chosen"], 0.5 * h[d].mean(), atol=1e-5)
    assert torch.isclose(metrics["rewards/rejected"], 0.5 * h[~d].mean(), atol=1e-5)
    assert torch.equal(metrics["rewards/accuracies"], ((h > z0) == d).float())


def test_pair_modules_refuse_unpaired_data(unpaired_batch):
    module = DPO(backbone="tiny://llama")
    module.configure_model()
    with pytest.raises(ValueError, match="unpaired .*KTO"):
        module.validation_step(unpaired_batch, 0)


def test_kto_fits_on_unpaired_data(kto_file, tmp_path):
    module = KTO(backbone="tiny://llama", beta=0.5, lr=1e-3)
    dm = PreferenceDataModule(train_file=str(kto_file), val_file=str(kto_file), processor=module.processor,
                              batch_size=4, max_length=128)
    checkpoint = ResumableCheckpoint(monitor="val/rewards/accuracies", mode="max", save_last=True, save_top_k=1)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", default_root_dir=tmp_path, log_every_n_steps=1,
                        val_check_interval=2, callbacks=[checkpoint], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    m = trainer.callback_metrics
    assert trainer.global_step == 4 and torch.isfinite(m["val/loss"])
    assert {"val/rewards/chosen", "val/rewards/rejected", "val/rewards/accuracies", "val/kl"} <= set(m)
    assert checkpoint.best_model_score is not None and checkpoint.last_model_path  # the monitor found its key
