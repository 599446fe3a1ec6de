"""`export`: fit 2 steps, export to a Hugging Face directory, reload with from_pretrained, same logits.
Also: the `copy` reference is left out of checkpoints and rebuilt on load."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText

from lightning_meddpo.backbones.loader import load_processor
from lightning_meddpo.data.datamodule import PreferenceDataModule
from lightning_meddpo.demo.synthetic import generate_demo_dataset
from lightning_meddpo.modules import DPO
from lightning_meddpo.policy import build_rows, row_images
from tests.conftest import run_program


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_demo_dataset(tmp_path_factory.mktemp("export_data"), n_train=16, n_val=8, n_test=8)


def fit(module, data, steps: int = 2):
    dm = PreferenceDataModule(str(data["train"]), str(data["val"]), batch_size=4, max_length=128, processor=module.processor)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    return trainer, dm


def model_inputs(batch) -> dict[str, torch.Tensor]:
    """One plain row (prompt + response) per view, as a model's own forward takes them."""
    rows = build_rows(batch, ("chosen", "rejected"), packed=False)
    images = row_images(batch, rows)
    return {"input_ids": rows.input_ids, "attention_mask": rows.valid.long(), "pixel_values": images.pixel_values}


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model.eval()(**inputs, use_cache=False).logits


def fitted_and_exported(tmp_path, data, *extra_args, **module_kwargs):
    torch.manual_seed(0)
    module = DPO(beta=0.5, lr=1e-2, **module_kwargs)
    trainer, dm = fit(module, data)
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    out = tmp_path / "hf"
    run_program("export", ["--ckpt_path", str(ckpt), "--out", str(out), *extra_args])
    batch = next(iter(dm.val_dataloader()))
    return module, out, model_inputs(batch), ckpt


def test_export_full_finetune_same_logits(tmp_path, data):
    module, out, inputs, ckpt = fitted_and_exported(tmp_path, data)
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    trained = logits(module.policy.model, inputs)
    assert (trained - logits(reloaded, inputs)).abs().max() < 1e-5
    # it really is the trained model, not the starting one
    base = DPO(reference="none")
    base.configure_model()
    assert (trained - logits(base.policy.model, inputs)).abs().max() > 1e-3
    # the processor is exported too and tokenises the same
    processor = load_processor(str(out))
    text = "USER: <image>\nIs there a lesion? ASSISTANT:"
    assert processor.tokenizer(text)["input_ids"] == module.processor.tokenizer(text)["input_ids"]
    assert processor.chat_template == module.processor.chat_template
    # the checkpoint leaves the copy reference out (it equals the starting weights) ...
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert not [k for k in state["state_dict"] if k.startswith("policy.reference.")]
    meddpo = state["meddpo"]
    assert meddpo["module_class"] == "lightning_meddpo.modules.dpo.DPO" and meddpo["reference_saved"] is False
    assert set(meddpo) == {"module_class", "reference_saved", "rng", "nonfinite_skipped", "left_out"}
    # ... and the policy's frozen weights (the CLIP layers after the feature layer): only their digests are kept
    frozen = {f"policy.model.{n}" for n, p in module.policy.model.named_parameters(remove_duplicate=False)
              if not p.requires_grad}
    assert frozen and set(meddpo["left_out"]) == frozen and not frozen & set(state["state_dict"])
    # ... and a fresh module loads it strictly, with the reference and the frozen weights rebuilt from the backbone
    fresh = DPO(beta=0.5, lr=1e-2)
    fresh.configure_model()
    fresh.on_load_checkpoint(state)  # as Lightning (and load_from_checkpoint) does before it loads the weights
    fresh.load_state_dict(state["state_dict"], strict=True)
    assert torch.allclose(logits(fresh.policy.model, inputs), trained, atol=1e-6)
    assert torch.allclose(logits(fresh.policy.reference, inputs), logits(base.policy.model, inputs), atol=1e-6)


def test_save_reference_keeps_it_in_the_checkpoint(tmp_path, data):
    module = DPO(save_reference=True)
    module.configure_model()
    keys = module.state_dict().keys()
    assert any(k.startswith("policy.reference.") for k in keys)
    module = DPO()
    module.configure_model()
    assert not any(k.startswith("policy.reference.") for k in module.state_dict().keys())


def test_export_lora_merged_same_logits(tmp_path, data):
    module, out, inputs, _ = fitted_and_exported(tmp_path, data, lora={"r": 4, "alpha": 8})
    assert not (out / "adapter_config.json").exists()
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    assert not any("lora_" in n for n, _ in reloaded.named_parameters())
    trained = logits(module.policy.model, inputs)
    assert (trained - logits(reloaded, inputs)).abs().max() < 1e-5
    base = DPO(reference="none")
    base.configure_model()
    assert (trained - logits(base.policy.model, inputs)).abs().max() > 1e-4  # the merge carried the training


def test_export_lora_unmerged_and_from_config(tmp_path, data):
    from peft import PeftModel

    torch.manual_seed(0)
    module = DPO(beta=0.5, lr=1e-2, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    trainer, dm = fit(module, data)
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    # the run's config, as LightningCLI writes it into the log directory
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "lightning_meddpo.modules.DPO", "init_args": {
        "beta": 0.5, "lr": 1e-2, "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}}}))
    out = tmp_path / "adapter"
    run_program("export", ["--ckpt_path", str(ckpt), "--config", str(config), "--out", str(out), "--no-merge"])
    adapter = json.loads((out / "adapter_config.json").read_text())
    base = AutoModelForImageTextToText.from_pretrained(adapter["base_model_name_or_path"])
    reloaded = PeftModel.from_pretrained(base, out)
    inputs = model_inputs(next(iter(dm.val_dataloader())))
    assert (logits(module.policy.model, inputs) - logits(reloaded, inputs)).abs().max() < 1e-5


def test_export_errors_name_the_problem(tmp_path, capsys):
    """A missing or wrong checkpoint: one message naming it (exit 2), no traceback, nothing written."""
    (tmp_path / "d").mkdir()
    for ckpt, message in [("missing.ckpt", "no such file"), ("d", "not a torch.distributed.checkpoint")]:
        with pytest.raises(SystemExit) as e:
            run_program("export", ["--ckpt_path", str(tmp_path / ckpt), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "export: error: " in err and str(tmp_path / ckpt) in err and message in err, err
    assert not (tmp_path / "o").exists()
