"""PreferencePolicy on the real tiny model: one concatenated forward, reference strategies, dropout."""

from __future__ import annotations

import pytest
import torch

from lightning_meddpo.backbones.loader import load_model
from lightning_meddpo.data.collate import PairEncoder, PreferenceCollator
from lightning_meddpo.data.datamodule import PreferenceDataset
from lightning_meddpo.data.records import read_preference_file
from lightning_meddpo.policy import PreferencePolicy, sequence_logps


@pytest.fixture(scope="module")
def batch(demo_dir, tiny_processor):
    records, _ = read_preference_file(demo_dir / "train.json")
    dataset = PreferenceDataset(records[:3], PairEncoder(tiny_processor, 256))
    return PreferenceCollator(tiny_processor.tokenizer.pad_token_id)([dataset[i] for i in range(3)])


def _single(model, text, images, row):
    """Log-prob of one row, computed alone with no padding: the reference answer."""
    n = int(text.attention_mask[row].sum())
    logits = model(
        input_ids=text.input_ids[row : row + 1, :n], attention_mask=text.attention_mask[row : row + 1, :n],
        pixel_values=images.pixel_values[row : row + 1],
    ).logits
    return sequence_logps(logits, text.labels[row : row + 1, :n])[0][0]


def test_concatenated_views_equal_separate_forwards(batch):
    policy = PreferencePolicy(load_model("tiny://llama"), reference="none")
    logps = policy.logps(batch, ("chosen", "rejected", "chosen_mprime"))
    for row in range(len(batch)):
        torch.testing.assert_close(logps["chosen"][row], _single(policy.model, batch.chosen, batch.images, row), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(logps["rejected"][row], _single(policy.model, batch.rejected, batch.images, row), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(logps["chosen_mprime"][row], _single(policy.model, batch.chosen, batch.rejected_images, row), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(logps["chosen"], logps["chosen_mprime"])  # m' really changes the score


def test_sequence_logps_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]]]))
    labels = torch.tensor([[-100, 2, 1]])  # position 0 is prompt; tokens 2 then 1 are scored
    logps, n = sequence_logps(logits, labels)
    torch.testing.assert_close(logps, torch.log(torch.tensor([0.25 * 0.2])))
    assert int(n) == 2


def test_copy_reference_is_frozen_and_starts_equal(batch):
    policy = PreferencePolicy(load_model("tiny://llama"), reference="copy")
    assert all(not p.requires_grad for p in policy.reference.parameters())
    views = ("chosen", "rejected")
    torch.testing.assert_close(policy.logps(batch, views)["chosen"], policy.reference_logps(batch, views)["chosen"])
    before = policy.reference_logps(batch, views)["chosen"].clone()
    optimizer = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.01)
    (-policy.logps(batch, views)["chosen"].sum()).backward()
    optimizer.step()
    policy.train()
    assert not policy.reference.training and policy.model.training
    torch.testing.assert_close(policy.reference_logps(batch, views)["chosen"], before)  # reference unchanged
    assert (policy.logps(batch, views)["chosen"] > before).all()  # the policy moved


def test_reference_none_and_adapter_without_lora_are_errors(batch):
    policy = PreferencePolicy(load_model("tiny://llama"), reference="none")
    assert policy.reference is None
    with pytest.raises(ValueError, match="no reference"):
        policy.reference_logps(batch, ("chosen",))
    with pytest.raises(ValueError, match="LoRA"):
        PreferencePolicy(load_model("tiny://llama"), reference="adapter")


def test_dropout_is_off_by_default():
    model = load_model("tiny://llama")
    model.config.text_config.attention_dropout = 0.3
    policy = PreferencePolicy(model, reference="none")
    assert policy.model.config.text_config.attention_dropout == 0.0
    assert all(m.p == 0.0 for m in policy.model.modules() if isinstance(m, torch.nn.Dropout))
