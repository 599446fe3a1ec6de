"""Fine-tuning modes and backbones: LoRA (reference = adapters disabled), frozen parts, gradient
checkpointing, Qwen2-VL / Qwen2.5-VL end to end, trust_remote_code pass-through. Tiny real models."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_meddpo.backbones import loader
from lightning_meddpo.backbones.build import part_parameters
from lightning_meddpo.data.datamodule import PreferenceDataModule
from lightning_meddpo.demo.synthetic import generate_demo_dataset
from lightning_meddpo.demo.tiny_qwen import build_tiny_qwen_vl
from lightning_meddpo.modules import DPO

VIEWS = ("chosen", "rejected")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_demo_dataset(tmp_path_factory.mktemp("ft_data"), n_train=16, n_val=8, n_test=8)


def datamodule(module, data, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(
        str(data["train"]), str(data["val"]), batch_size=4, max_length=128, processor=module.processor, **kwargs
    )
    dm.setup("fit")
    return dm


def first_batch(module, data, **kwargs):
    return next(iter(datamodule(module, data, **kwargs).train_dataloader()))


def built(**kwargs) -> DPO:
    torch.manual_seed(0)
    module = DPO(**kwargs)
    module.configure_model()
    return module


def sgd_step(module: DPO, batch, lr: float = 0.05) -> torch.Tensor:
    loss, _ = module.compute_loss(batch)
    loss.backward()
    with torch.no_grad():
        for p in module.policy.model.parameters():
            if p.grad is not None:
                p -= lr * p.grad.sign()
                p.grad = None
    return loss


# -- LoRA ----------------------------------------------------------------------------------------------
def test_lora_reference_is_the_model_with_adapters_disabled(data):
    module = built(lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    assert module.reference_strategy == "adapter" and module.policy.reference is None
    trainable = [n for n, p in module.policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = first_batch(module, data)

    policy0 = module.policy.logps(batch, VIEWS)
    ref0 = module.policy.reference_logps(batch, VIEWS)
    for v in VIEWS:  # LoRA B starts at zero: the adapted model IS the base model
        assert torch.allclose(policy0[v], ref0[v], atol=1e-5)

    sgd_step(module, batch)
    policy1 = module.policy.logps(batch, VIEWS)
    ref1 = module.policy.reference_logps(batch, VIEWS)
    assert module.policy.model.training  # reference scoring restores train mode
    for v in VIEWS:
        assert not torch.allclose(policy1[v], ref1[v], atol=1e-3)  # the adapters moved the policy
        assert torch.allclose(ref1[v], ref0[v], atol=1e-5)  # the reference did not move: adapters are off
    # and the reference really is the base model: a plain from_pretrained backbone scores the same
    base = built(reference="none")
    base_logps = base.policy.logps(batch, VIEWS)
    for v in VIEWS:
        assert torch.allclose(base_logps[v], ref1[v], atol=1e-5)


def test_lora_adapts_the_language_model_only_by_default(data):
    """As LLaVA's LoRA training: CLIP's q/k/v projections share the target names but stay unadapted, so
    the adapter-disabled reference reuses the policy's image features."""
    module = built(lora={"r": 4, "alpha": 8})
    adapted = [n for n, _ in module.policy.model.named_modules() if n.endswith("lora_A")]
    assert adapted and all("language_model" in n for n in adapted)
    assert module.policy.shares_image_features
    vision = built(lora={"r": 4, "alpha": 8, "vision": True})
    assert any("vision_tower" in n for n, _ in vision.policy.model.named_modules() if n.endswith("lora_A"))
    assert not vision.policy.shares_image_features


def test_lora_settings_are_saved_as_a_plain_dict():
    from lightning_meddpo.modules import LoraSettings

    module = DPO(lora=LoraSettings(r=2, target_modules=["q_proj"]))
    checkpoint = {"hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["hyper_parameters"]["lora"] == {"r": 2, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj"],
                                                      "vision": False}
    assert checkpoint["meddpo"]["module_class"] == "lightning_meddpo.modules.dpo.DPO"


# -- freezing ------------------------------------------------------------------------------------------
def trainable_ids(module) -> set[int]:
    return {id(p) for p in module.policy.model.parameters() if p.requires_grad}


@pytest.mark.parametrize("kwargs", [{"freeze": ["vision_tower", "projector"]},
                                    {"freeze_vision_tower": True, "freeze_projector": True}])
def test_freeze_vision_tower_and_projector(data, kwargs):
    if "freeze" in kwargs:
        module = built(**kwargs)
    else:  # the deprecated booleans still work, with a warning naming the one setting
        with pytest.warns(DeprecationWarning, match=r"freeze_vision_tower: true is deprecated; write freeze: \[vision_tower\]"):
            module = built(**kwargs)
    model = module.policy.model
    trainable = trainable_ids(module)
    for part in ("vision_tower", "projector"):
        assert not {id(p) for p in part_parameters(model, part)} & trainable
    lm = {id(p) for p in part_parameters(model, "language_model")}
    assert lm and lm <= trainable
    batch = first_batch(module, data)
    loss, _ = module.compute_loss(batch)
    loss.backward()
    assert all(p.grad is None for p in part_parameters(model, "vision_tower"))
    assert all(p.grad is not None for p in part_parameters(model, "language_model"))


def test_freeze_only_projector_keeps_vision_tower_trainable():
    module = built(reference="none", freeze=["projector"])
    trainable = trainable_ids(module)
    model = module.policy.model
    assert not {id(p) for p in part_parameters(model, "projector")} & trainable
    # the used CLIP layers train; the unused last layer (vision_feature_layer=-2) is frozen
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    assert layers[0].self_attn.q_proj.weight.requires_grad
    assert not layers[-1].self_attn.q_proj.weight.requires_grad


def test_freeze_unknown_part_is_an_error():
    with pytest.raises(ValueError, match="unknown part"):
        DPO(freeze=["vision"])


def test_full_finetune_trains_everything_used(data):
    module = built()
    batch = first_batch(module, data)
    loss, _ = module.compute_loss(batch)
    loss.backward()
    no_grad = [n for n, p in module.policy.model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []  # every trainable parameter gets a gradient (DDP/FSDP resume rely on it)
    assert all(not p.requires_grad for p in module.policy.reference.parameters())


# -- gradient checkpointing ---------------------------------------------------------------------------
def test_gradient_checkpointing_same_loss_and_grads(data):
    plain = built()
    ckpt = built(gradient_checkpointing=True)
    assert ckpt.policy.model.is_activation_checkpointing and not plain.policy.model.is_activation_checkpointing
    batch = first_batch(plain, data)
    losses, grads = [], []
    for module in (plain, ckpt):
        loss, _ = module.compute_loss(batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in module.policy.model.named_parameters() if p.grad is not None})
    assert torch.isfinite(losses[0])
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


# -- Qwen2-VL / Qwen2.5-VL -----------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vl_dpo_trains(tmp_path, data, version):
    path = build_tiny_qwen_vl(tmp_path / version, version=version)
    # saved as a standard Qwen2-VL directory (our video-less processor class is never named in it)
    assert not [f.name for f in path.glob("*.json") if "QwenVLImageProcessor" in f.read_text()]
    module = DPO(backbone=str(path), beta=0.5, lr=1e-2)
    dm = PreferenceDataModule(str(data["train"]), str(data["val"]), batch_size=4, max_length=128,
                              processor=module.processor)  # no image_placeholder: Qwen-VL's is the default
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    vision_start = module.processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert (batch.prompt.input_ids == vision_start).sum(dim=1).tolist() == [1] * 4  # one wrapped image per prompt
    assert "mm_token_type_ids" in batch.prompt.extra and "image_grid_thw" in batch.images.extra
    image_id = module.processor.image_token_id
    # the collator marks exactly the image tokens as multimodal
    assert torch.equal(batch.prompt.extra["mm_token_type_ids"] == 1, batch.prompt.input_ids == image_id)

    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    loss = trainer.callback_metrics["train/loss_step"]
    assert torch.isfinite(loss)
    # the policy moved, the reference did not
    module.policy.eval()
    policy = module.policy.logps(batch, VIEWS)
    ref = module.policy.reference_logps(batch, VIEWS)
    assert not torch.allclose(policy["chosen"], ref["chosen"], atol=1e-4)
    # Qwen-VL parts for `freeze`: the projector is visual.merger, the vision tower the rest of visual
    model = module.policy.model
    merger = {id(p) for p in model.model.visual.merger.parameters()}
    assert {id(p) for p in part_parameters(model, "projector")} == merger
    tower = {id(p) for p in part_parameters(model, "vision_tower")}
    assert tower and not tower & merger and tower | merger == {id(p) for p in model.model.visual.parameters()}


# -- trust_remote_code -----------------------------------------------------------------------------------
def test_trust_remote_code_defaults_off_and_is_passed_through(monkeypatch):
    seen = []

    def spy(cls_from_pretrained):
        def wrapped(*args, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return cls_from_pretrained(*args, **kwargs)
        return wrapped

    import transformers

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", spy(transformers.AutoProcessor.from_pretrained))
    monkeypatch.setattr(loader.AutoModelForImageTextToText, "from_pretrained",
                        spy(loader.AutoModelForImageTextToText.from_pretrained))
    module = built(reference="none")
    assert module.hparams.trust_remote_code is False
    assert seen == [False, False]
    seen.clear()
    built(reference="none", trust_remote_code=True)
    assert seen == [True, True]
