"""`reference: precomputed`: the starting model's log-probs computed once, cached by fingerprint, reused;
the same training as a frozen copy; recomputed when the data, weights, template or corruption change;
refused where it cannot be right."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_meddpo.data.datamodule import PreferenceDataModule
from lightning_meddpo.demo.synthetic import generate_demo_dataset
from lightning_meddpo.modules import DPO, KTO, Multimodal
from lightning_meddpo.modules.precomputed import reference_fingerprint
from lightning_meddpo.reference_cache import ReferenceTable, fingerprint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Text-rejected pairs, each with an m' (rejected_image)."""
    return generate_demo_dataset(tmp_path_factory.mktemp("precomputed"), n_train=16, n_val=8, n_test=4)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Half text-rejected, half image-rejected pairs (the targeted mix)."""
    return generate_demo_dataset(tmp_path_factory.mktemp("precomputed_mixed"), n_train=16, n_val=8, n_test=4,
                                 image_pair_fraction=0.5)


def datamodule(module, data, **kwargs):
    return PreferenceDataModule(str(data["train"]), str(data["val"]), batch_size=4, max_length=128,
                                processor=module.processor, **kwargs)


def fit(module, dm, steps=2, ckpt_path=None, default_root_dir=None):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, limit_val_batches=1, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=default_root_dir)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("cls, kwargs", [(DPO, {}), (Multimodal, {"loss_type": "mdpo"}), (Multimodal, {"loss_type": "targeted"})])
def test_trains_as_a_frozen_copy(tmp_path, data, mixed, cls, kwargs):
    data = mixed if kwargs.get("loss_type") == "targeted" else data
    runs = {}
    for reference in ("copy", "precomputed"):
        torch.manual_seed(0)
        module = cls(beta=0.5, lr=1e-2, reference=reference, reference_cache_dir=str(tmp_path / "cache"), **kwargs)
        dm = datamodule(module, data)
        fit(module, dm)
        runs[reference] = module
    assert runs["precomputed"].policy.reference is None  # no second model in memory
    table = runs["precomputed"].policy.reference_table
    views = runs["precomputed"].reference_views
    assert len(table) == 16 + 8 and set(table.views) == set(views)
    batch = next(iter(dm.val_dataloader()))
    # the table holds what the frozen copy computes, and both runs trained to the same model
    torch.testing.assert_close(table.lookup(batch.keys, views, "cpu"), runs["copy"].policy.reference_logps(batch, views),
                               atol=1e-5, rtol=1e-6)
    after = {name: m.policy.logps(batch, views) for name, m in runs.items()}
    torch.testing.assert_close(after["precomputed"], after["copy"], atol=1e-4, rtol=1e-5)
    assert not torch.allclose(after["copy"]["chosen"], table.lookup(batch.keys, ("chosen",), "cpu")["chosen"])  # it trained


def test_cached_on_disk_reused_and_resumed(tmp_path, data, caplog):
    cache = tmp_path / "cache"
    module = DPO(beta=0.5, lr=1e-2, reference="precomputed", reference_cache_dir=str(cache))
    trainer = fit(module, datamodule(module, data), default_root_dir=tmp_path)
    (path,) = cache.glob("*.json")
    assert not list(data["root"].glob("*reference*"))  # never beside the user's data
    stored = ReferenceTable.load(path)
    assert stored.values == module.policy.reference_table.values
    ckpt = tmp_path / "two.ckpt"
    trainer.save_checkpoint(ckpt)
    stamp = path.stat().st_mtime_ns

    resumed = DPO(beta=0.5, lr=1e-2, reference="precomputed", reference_cache_dir=str(cache))
    with caplog.at_level("INFO"):
        fit(resumed, datamodule(resumed, data), steps=4, ckpt_path=str(ckpt))
    assert "24 pairs from" in caplog.text and path.stat().st_mtime_ns == stamp  # read, not recomputed

    path.unlink()
    lost = DPO(beta=0.5, lr=1e-2, reference="precomputed", reference_cache_dir=str(cache))
    with pytest.raises(ValueError, match="cannot be computed from trained weights"):
        fit(lost, datamodule(lost, data), steps=4, ckpt_path=str(ckpt))


def key_of(module, dm):
    dm.setup("fit")
    module.trainer = L.Trainer(accelerator="cpu", logger=False)
    return fingerprint(reference_fingerprint(module, dm))


def test_the_cache_file_changes_with_weights_template_and_tokenisation(tmp_path, data):
    module = DPO(reference="precomputed")
    dm = lambda **kw: PreferenceDataModule(str(data["train"]), str(data["val"]), processor=module.processor, **kw)  # noqa: E731
    now = key_of(module, dm())
    assert key_of(module, dm()) == now
    assert key_of(module, dm(corruption={"type": "crop", "min_area": 0.1})) != now
    assert key_of(module, dm(max_length=64)) != now
    templated = DPO(reference="precomputed", chat_template="vicuna_v1")
    assert key_of(templated, dm()) != now
    other_weights = DPO(reference="precomputed", backbone="tiny://mistral")
    assert key_of(other_weights, PreferenceDataModule(str(data["train"]), str(data["val"]),
                                                     processor=other_weights.processor)) != now


def test_a_pair_is_keyed_by_its_text_and_image_bytes_not_its_id_or_file_times(tmp_path, data):
    copy = tmp_path / "data"
    shutil.copytree(data["root"], copy)
    module = DPO(reference="precomputed")

    def keys() -> list[str]:
        dm = PreferenceDataModule(str(copy / "train.json"), str(copy / "val.json"), processor=module.processor)
        dm.setup("fit")
        return dm.content_keys()["train"]

    base = keys()
    assert len(set(base)) == len(base) and keys() == base
    records = json.loads((copy / "train.json").read_text())
    image = copy / records[3]["image"]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert keys() == base  # a touched file is the same pair
    records[0]["conversations"][1]["value"] = "No, there is no lesion in this image."
    (copy / "train.json").write_text(json.dumps(records))
    text_changed = keys()
    assert text_changed[0] != base[0] and text_changed[1:] == base[1:]
    stat = image.stat()
    other = copy / records[4]["image"]
    image.write_bytes(other.read_bytes())  # another image's bytes; its old time kept
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    image_changed = keys()
    assert [i for i, (a, b) in enumerate(zip(text_changed, image_changed)) if a != b] == [3]


def test_refused_where_it_cannot_be_right(tmp_path, data):
    with pytest.raises(ValueError, match="KL baseline"):
        KTO(reference="precomputed")
    records = json.loads(data["train"].read_text())
    for r in records:
        r.pop("rejected_image")
        r["pair_type"] = "text"
        r["rejected_conversations"][1]["value"] = "The image shows the liver." if "liver" not in r["conversations"][1]["value"] else "The image shows the lung."
    train = tmp_path / "train.json"
    train.write_text(json.dumps(records))
    shutil.copytree(data["images"], tmp_path / "images")
    module = Multimodal(loss_type="copo", reference="precomputed", reference_cache_dir=str(tmp_path / "cache"))
    dm = PreferenceDataModule(str(train), str(train), batch_size=4, processor=module.processor, corruption="crop")
    with pytest.raises(ValueError, match="new corruption every epoch"):
        fit(module, dm)


@pytest.mark.slow
def test_two_processes_compute_their_shards(tmp_path):
    """FSDP2 over 2 CPU processes: each rank scores its shard, every rank gets the whole table."""
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "lightning_meddpo", "fit", "--config", str(ROOT / "configs/formulations/dpo.yaml"), "--config", str(ROOT / "configs/backbones/demo.yaml"),
           "--config", str(ROOT / "configs/strategies/fsdp2.yaml"), "--trainer.devices=2", "--trainer.max_steps=2",
           "--model.init_args.reference=precomputed", f"--model.init_args.reference_cache_dir={cache}",
           "--data.init_args.demo", "{n_train: 16, n_val: 8, n_test: 4}",
           *[f"--data.init_args.{s}_file={tmp_path / 'data' / f'{s}.json'}" for s in ("train", "val", "test")],
           f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--trainer.default_root_dir={tmp_path}",
           "--trainer.enable_progress_bar=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    (path,) = cache.glob("*.json")
    table = ReferenceTable.load(path)
    assert len(table) == 16 + 8 and not table.missing(table.values["rejected"])  # every pair, every view
