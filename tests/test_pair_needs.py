"""Each formulation gets pairs it can learn from, checked before step 1: pairs with no preference signal
for it and missing m' are errors naming the records (or skipped and counted), and m' is processed only
where a loss scores it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lightning_meddpo.data.datamodule import NO_SIGNAL, PreferenceDataModule
from lightning_meddpo.data.needs import PairNeeds
from lightning_meddpo.modules import DPO, KTO, SFT, MMedPO, Multimodal, ReferenceFree


def paper_file(demo_dir: Path, tmp_path: Path, name: str, edit) -> Path:
    """Demo records rewritten by `edit(record, index)`, images linked, as the paper's JSON array."""
    records = json.loads((demo_dir / "train.json").read_text())[:8]
    for i, r in enumerate(records):
        edit(r, i)
    if not (tmp_path / "images").exists():
        shutil.copytree(demo_dir / "images", tmp_path / "images")
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def copo_record(r, i):
    """The paper's CoPO file: the same answer on both sides, the rejected image noised."""
    r["rejected_conversations"] = json.loads(json.dumps(r["conversations"]))
    r.pop("pair_type")


def setup(path: Path, needs: PairNeeds, tiny_processor, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(str(path), str(path), processor=tiny_processor, batch_size=4, **kwargs)
    dm.needs = needs
    dm.setup("fit")
    return dm


def test_image_only_pairs_under_a_text_loss_are_refused_naming_them(demo_dir, tmp_path, tiny_processor):
    path = paper_file(demo_dir, tmp_path, "copo.json", copo_record)
    dpo = DPO(beta=0.1).pair_needs
    with pytest.raises(ValueError, match="8 of 8 pairs carry no preference signal for DPO") as info:
        setup(path, dpo, tiny_processor)
    assert "synth-train-00000" in str(info.value) and "skip_invalid" in str(info.value)
    for module in (ReferenceFree(loss_type="simpo"), KTO()):
        with pytest.raises(ValueError, match="no preference signal"):
            setup(path, module.pair_needs, tiny_processor)
    # the same file is what CoPO, mDPO and MMedPO learn from; SFT needs no difference at all
    for module in (Multimodal(loss_type="copo"), Multimodal(loss_type="mdpo"), MMedPO(), SFT()):
        assert len(setup(path, module.pair_needs, tiny_processor).datasets["train"]) == 8


def test_skip_invalid_counts_the_pairs_without_signal(demo_dir, tmp_path, tiny_processor):
    path = paper_file(demo_dir, tmp_path, "half.json", lambda r, i: copo_record(r, i) if i % 2 else None)
    dm = setup(path, DPO().pair_needs, tiny_processor, skip_invalid=True)
    assert len(dm.datasets["train"]) == 4 and dm.skipped[NO_SIGNAL] == 8  # 4 in train, 4 in val (same file)


def test_an_mprime_equal_to_m_gives_copo_nothing(demo_dir, tmp_path, tiny_processor):
    def same_image(r, i):
        copo_record(r, i)
        if i < 3:
            r["rejected_image"] = r["image"]
    path = paper_file(demo_dir, tmp_path, "same.json", same_image)
    with pytest.raises(ValueError, match="3 of 8 pairs carry no preference signal for CoPO") as info:
        setup(path, Multimodal(loss_type="copo").pair_needs, tiny_processor)
    assert "m' is absent or equals m" in str(info.value)
    # on-the-fly corruption makes an m' that differs
    def no_mprime(r, i):
        copo_record(r, i)
        r.pop("rejected_image")
        r["pair_type"] = "image"  # m' comes from data.corruption
    path = paper_file(demo_dir, tmp_path, "none.json", no_mprime)
    with pytest.raises(Exception, match="rejected_image.*CoPO scores the chosen answer on a corrupted image"):
        setup(path, Multimodal(loss_type="copo").pair_needs, tiny_processor)  # no m' and no corruption
    assert len(setup(path, Multimodal(loss_type="copo").pair_needs, tiny_processor, corruption="crop").datasets["train"]) == 8


def test_a_missing_mprime_is_named_at_setup_not_at_step_98(demo_dir, tmp_path, tiny_processor):
    """Records with and without rejected_image: fine where m' is never scored, an error naming the records
    where it is (it used to crash in collate mid-epoch)."""
    path = paper_file(demo_dir, tmp_path, "mixed.json", lambda r, i: r.pop("rejected_image") if i in (2, 5) else None)
    dm = setup(path, DPO().pair_needs, tiny_processor)
    batch = next(iter(dm.train_dataloader()))
    assert batch.rejected_images is None  # DPO never scores m': not even opened
    for module in (Multimodal(loss_type="mdpo"), MMedPO()):
        with pytest.raises(Exception, match="synth-train-00002.*rejected_image.*scores"):
            setup(path, module.pair_needs, tiny_processor)
    dm = setup(path, MMedPO().pair_needs, tiny_processor, skip_invalid=True)
    assert len(dm.datasets["train"]) == 6


def test_targeted_checks_each_pair_by_its_type(demo_dir, tmp_path, tiny_processor):
    def mix(r, i):
        if i % 2:
            copo_record(r, i)  # image pairs
        else:
            r.pop("rejected_image")  # text pairs need no m'
    path = paper_file(demo_dir, tmp_path, "targeted.json", mix)
    dm = setup(path, Multimodal(loss_type="targeted").pair_needs, tiny_processor)
    batch = next(iter(dm.train_dataloader()))
    assert batch.has_mprime.tolist() == batch.image_rejected.tolist()  # m' exactly for the image pairs
