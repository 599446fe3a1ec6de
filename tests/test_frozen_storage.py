"""Frozen weights stored in the dtype autocast computes them in (backbones/build.store_frozen_in): the same
log-probs and gradients bit for bit, only layers whose every parameter is frozen and unshared, only exact values
where a checkpoint saves them; and the module does it under bf16-mixed only, saving and resuming the same values."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from torch import nn

from lightning_meddpo.backbones.build import LoraSettings, prepare_policy_model, store_frozen_in
from lightning_meddpo.backbones.loader import load_model
from lightning_meddpo.checkpoints import values_digest
from lightning_meddpo.data.collate import PairEncoder, PreferenceCollator
from lightning_meddpo.data.datamodule import PreferenceDataModule, PreferenceDataset
from lightning_meddpo.data.records import read_preference_file
from lightning_meddpo.modules import DPO
from lightning_meddpo.policy import PreferencePolicy

VIEWS = ("chosen", "rejected", "chosen_mprime")
BF16 = torch.bfloat16


def rounded_to_bf16(model: nn.Module) -> nn.Module:
    """The model as a backbone saved in bfloat16 loads: float32 tensors holding bfloat16 values."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(BF16))
    return model


@pytest.fixture(scope="module")
def batch(demo_dir, tiny_processor):
    records, _ = read_preference_file(demo_dir / "train.json")
    dataset = PreferenceDataset(records[:3], PairEncoder(tiny_processor, 256))
    return PreferenceCollator(tiny_processor.tokenizer.pad_token_id)([dataset[i] for i in range(3)])


def scored(policy: PreferencePolicy, batch) -> tuple[dict, dict, dict]:
    """Policy and reference log-probs under CPU bf16 autocast, and the gradients of a DPO-like objective."""
    with torch.autocast("cpu", dtype=BF16):
        logps = policy.logps(batch, VIEWS)
        ref = policy.reference_logps(batch, VIEWS)
        loss = -(logps["chosen"] - ref["chosen"] - logps["rejected"] + ref["rejected"]).sigmoid().log().sum()
        loss = loss + logps["chosen_mprime"].sum() * 0.1
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    return logps, ref, grads


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_lora_base_in_bf16_gives_bitwise_the_same_log_probs_and_gradients(batch):
    model = rounded_to_bf16(load_model("tiny://llama"))
    model = prepare_policy_model(model, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]), [], False)
    with torch.no_grad():  # B starts at zero: give the adapters a value so the base and adapters both matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    stored = copy.deepcopy(model)
    done = store_frozen_in(stored, BF16)
    linear_frozen = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                        for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.requires_grad)
    assert done.stored == linear_frozen and done.kept == 0

    expected = scored(PreferencePolicy(model, reference="adapter"), batch)
    got = scored(PreferencePolicy(stored, reference="adapter"), batch)
    for e, g in zip(expected, got):
        assert_same(e, g)
    assert got[2] and all("lora_" in n for n in got[2])
    dtypes = {n: p.dtype for n, p in stored.named_parameters()}
    kept = ("lora_", "norm", "embed_tokens", "position_embedding", "class_embedding")  # trained, or not autocast's
    assert all(d == torch.float32 for n, d in dtypes.items() if any(k in n for k in kept))
    assert all(dtypes[n] == BF16 for n in dtypes if n.endswith("base_layer.weight"))


def test_a_copy_reference_takes_any_value_and_scores_the_same(batch):
    """Full fine-tuning: the reference copy (never saved) is stored in bf16 whatever its values; under autocast its
    log-probs are those of the float32 copy, and the policy (trained) is untouched."""
    policy = PreferencePolicy(load_model("tiny://llama"), reference="copy")
    plain = copy.deepcopy(policy.reference)
    assert store_frozen_in(policy.reference, BF16).stored == 0  # random float32 values: not exact, kept
    done = store_frozen_in(policy.reference, BF16, exact_only=False)
    assert done.stored > 0 and all(p.dtype == torch.float32 for p in policy.model.parameters())
    logps, ref, grads = scored(policy, batch)
    policy.reference = plain
    logps2, ref2, grads2 = scored(policy, batch)
    assert_same(ref, ref2)
    assert_same(logps, logps2)


def test_only_layers_wholly_frozen_and_unshared_are_stored():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, tie_word_embeddings=True)
    model = rounded_to_bf16(LlamaForCausalLM(config)).requires_grad_(False)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)  # trains: stays float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    done = store_frozen_in(model, BF16)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert {attn.q_proj.weight.dtype, attn.o_proj.weight.dtype, mlp.down_proj.weight.dtype} == {BF16}
    assert mlp.up_proj.weight.dtype == torch.float32  # trainable
    assert model.lm_head.weight.dtype == torch.float32  # tied to the embeddings, which autocast does not cast
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32  # not a linear layer
    assert done.stored == 4 * 32 * 32 + 2 * 32 * 64 and done.kept == 0

    inexact = LlamaForCausalLM(config).requires_grad_(False)  # random float32 values
    with torch.no_grad():
        inexact.model.layers[0].self_attn.q_proj.weight[0, 0] = 1 + 2**-12  # one value bf16 cannot hold
        inexact.model.layers[0].self_attn.k_proj.weight.copy_(inexact.model.layers[0].self_attn.k_proj.weight.to(BF16))
    done = store_frozen_in(inexact, BF16)
    assert inexact.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert inexact.model.layers[0].self_attn.k_proj.weight.dtype == BF16
    assert done.stored == 32 * 32 and done.kept > 0


def fit(backbone, demo_dir, root, precision: str, store: bool, monkeypatch, steps: int = 2):
    if not store:
        monkeypatch.setattr(DPO, "store_frozen_in_compute_dtype", lambda self: None)
    torch.manual_seed(0)
    module = DPO(backbone=str(backbone), lora={"r": 4, "alpha": 8}, lr=1e-2, beta=0.5)
    dm = PreferenceDataModule(str(demo_dir / "train.json"), str(demo_dir / "val.json"), batch_size=4, max_length=128,
                              processor=module.processor, shuffle=False)
    losses = []
    record = type("Losses", (L.Callback,), {"on_train_batch_end": lambda self, t, m, out, *a: losses.append(out["loss"].item())})
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", precision=precision, logger=False, limit_val_batches=0,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(root), callbacks=[record()], enable_checkpointing=False)
    trainer.fit(module, datamodule=dm)
    monkeypatch.undo()
    return module, losses, trainer


def test_bf16_mixed_run_stores_the_frozen_base_and_trains_the_same(bf16_backbone, demo_dir, tmp_path, monkeypatch):
    """Under bf16-mixed the LoRA base is bfloat16 (2 of the 6 bytes a value it cost), the steps' losses and the
    adapters after them are bitwise those of the float32-stored run; a checkpoint holds the same values, and a
    32-true run stores nothing."""
    stored, losses, trainer = fit(bf16_backbone, demo_dir, tmp_path / "a", "bf16-mixed", True, monkeypatch)
    plain, plain_losses, _ = fit(bf16_backbone, demo_dir, tmp_path / "b", "bf16-mixed", False, monkeypatch)
    assert losses == plain_losses and len(losses) == 2 and all(math.isfinite(x) for x in losses)
    base = {n: p for n, p in stored.policy.model.named_parameters() if n.endswith("base_layer.weight")}
    assert base and all(p.dtype == BF16 for p in base.values())
    plain_params = dict(plain.policy.model.named_parameters())
    for name, p in stored.policy.model.named_parameters():
        assert torch.equal(p.float(), plain_params[name].float()), name

    ckpt = tmp_path / "stored.ckpt"
    trainer.save_checkpoint(ckpt)  # by default the frozen base is left out: its digests equal the float32 values'
    left_out = torch.load(ckpt, map_location="cpu", weights_only=True)["meddpo"]["left_out"]
    frozen = {n: p for n, p in plain.policy.model.named_parameters() if not p.requires_grad}
    assert set(left_out) == {f"policy.model.{n}" for n in frozen}
    assert all(left_out[f"policy.model.{n}"][1] == values_digest(p) for n, p in frozen.items())
    stored.hparams["save_frozen_weights"] = True  # kept, the checkpoint holds the same values
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for name, p in plain.policy.model.named_parameters():
        assert torch.equal(state[f"policy.model.{name}"].float(), p.float()), name

    fp32, _, _ = fit(bf16_backbone, demo_dir, tmp_path / "c", "32-true", True, monkeypatch, steps=1)
    assert all(p.dtype == torch.float32 for p in fp32.policy.model.parameters())


def test_the_benchmark_measures_less_memory_with_the_frozen_base_in_bf16():
    """benchmarks/frozen_storage.py runs (a small shape): LoRA's peak is lower with the base stored in bf16."""
    import sys

    from tests.conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from frozen_storage import main

    (row,) = main(["--hidden", "64", "--layers", "2"])
    assert 0 < row["stored_mib"] < row["kept_mib"] and row["planned_mib"] > 0
