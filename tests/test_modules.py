"""The family modules on the real tiny backbone and real demo batches (no mocks).

One small demo dataset (half the pairs image-rejected, every record with a rejected_image m' and a
weighted_score) is encoded once through PreferenceDataModule, as the CLI wires it (the module's
processor). Every module is built with `configure_model()` and scored with `compute_loss(batch)`.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import warnings
from collections import Counter

import pytest
import torch
from transformers import PreTrainedModel

from lightning_meddpo.data.datamodule import PreferenceDataModule
from lightning_meddpo.losses import (
    DPO_LOSS_TYPES,
    PairLogps,
    anchor_loss,
    copo_loss,
    dpo_loss,
    kto_kl_baseline,
    kto_loss,
)
from lightning_meddpo.modules import DPO, KTO, SFT, MMedPO, Multimodal, ReferenceFree

BACKBONE = "tiny://llama"
LOG2 = math.log(2.0)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """One validation batch of 8 pairs: 4 text-rejected, 4 image-rejected (fixed order)."""
    root = tmp_path_factory.mktemp("families_demo")
    processor = SFT(backbone=BACKBONE).processor
    dm = PreferenceDataModule(
        train_file=str(root / "train.json"), val_file=str(root / "val.json"),
        demo={"n_train": 2, "n_val": 8, "n_test": 0, "image_pair_fraction": 0.5},
        batch_size=8, max_length=128, processor=processor,
    )
    dm.prepare_data()
    dm.setup("fit")
    out = next(iter(dm.val_dataloader()))
    assert out.rejected_images is not None and out.weights is not None
    assert 0 < int(out.image_rejected.sum()) < len(out)
    return out


def build(cls, **kwargs):
    module = cls(backbone=BACKBONE, **kwargs)
    module.configure_model()
    return module


def perturb(module, scale: float = 0.05, seed: int = 0) -> None:
    """Move the policy away from its reference so that log-ratios h are not all zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.policy.model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def grads(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.policy.model.parameters() if p.grad is not None])


def with_mprime(batch, images):
    return dataclasses.replace(batch, rejected_images=images)


FORMULATIONS = (
    [(DPO, {"loss_type": t}) for t in sorted(DPO_LOSS_TYPES)]
    + [(DPO, {"loss_type": "sigmoid", "label_smoothing": 0.1}), (DPO, {"loss_type": "sigmoid", "nll_weight": 1.0})]
    + [(ReferenceFree, {"loss_type": name}) for name in ("simpo", "cpo", "orpo")]
    + [(Multimodal, {"loss_type": name}) for name in ("copo", "mdpo", "targeted")]
    + [(MMedPO, {}), (KTO, {}), (SFT, {})]
)
TERMS = {DPO: ["loss/dpo"], MMedPO: ["loss/mmedpo"], KTO: ["loss/kto"], SFT: []}
MULTIMODAL_TERMS = {"copo": ["loss/copo"], "mdpo": ["loss/dpo", "loss/copo", "loss/anchor"], "targeted": ["loss/dpo", "loss/copo"]}
_CACHE: dict[tuple, object] = {}


def shared(cls, **kwargs):
    """One built, perturbed module per family, reused across its formulations: a formulation is
    the module's hparams, which compute_loss reads on every call (keeps the suite fast)."""
    key = (cls, kwargs.get("loss_type") == "bco_pair")  # bco_pair's module has its baseline buffers
    if key not in _CACHE:
        module = build(cls, **({"loss_type": "bco_pair"} if key[1] else {}))
        perturb(module)
        _CACHE[key] = module
    module = _CACHE[key]
    defaults = {"loss_type": "sigmoid", "label_smoothing": 0.0, "nll_weight": 0.0} if cls is DPO else {}
    module.hparams.update({**defaults, **kwargs})
    module.zero_grad()
    return module


@pytest.mark.parametrize(
    ("cls", "kwargs"), FORMULATIONS, ids=[f"{c.__name__}-{'-'.join(map(str, k.values()))}" for c, k in FORMULATIONS]
)
def test_every_formulation_gives_finite_loss_and_gradient(batch, cls, kwargs):
    module = shared(cls, **kwargs)
    loss, metrics = module.compute_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    g = grads(module)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert "rewards/accuracies" in metrics  # the checkpoint monitor key
    for name, value in metrics.items():
        assert torch.isfinite(value).all(), name
        assert not value.requires_grad, name
    if cls is ReferenceFree:
        terms = [f"loss/{kwargs['loss_type']}", "loss/nll"]
    elif cls is Multimodal:
        terms = MULTIMODAL_TERMS[kwargs["loss_type"]] + (["rewards_img/margins"] if kwargs["loss_type"] != "targeted" else [])
    else:
        terms = TERMS[cls] + (["loss/nll"] if kwargs.get("nll_weight") else [])
    assert set(terms) <= set(metrics)


# -- reference-free --------------------------------------------------------------------------------


def live_models() -> Counter:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on every object touches deprecated torch attributes
        warnings.simplefilter("ignore")
        return Counter(type(o) for o in gc.get_objects() if isinstance(o, PreTrainedModel))


@pytest.mark.parametrize("loss", ["simpo", "cpo", "orpo"])
def test_reference_free_builds_no_reference_model(loss):
    before = live_models()
    module = build(ReferenceFree, loss_type=loss)
    created = live_models() - before
    assert module.policy.reference is None
    assert module.policy.reference_strategy == "none"
    # one instance of each model class (the policy and its sub-models), no second copy
    assert type(module.policy.model) in created and set(created.values()) == {1}
    in_policy = {id(m) for m in module.policy.model.modules()}
    assert all(id(m) in in_policy for m in module.modules() if isinstance(m, PreTrainedModel))
    n_module = sum(p.numel() for p in module.parameters())
    assert n_module == sum(p.numel() for p in module.policy.model.parameters())


def test_reference_free_refuses_a_reference():
    with pytest.raises(ValueError, match="reference must be 'none'"):
        ReferenceFree(backbone=BACKBONE, loss_type="simpo", reference="copy")
    with pytest.raises(ValueError, match="unknown loss"):
        ReferenceFree(backbone=BACKBONE, loss_type="dpo")


def test_an_injected_optimizer_gets_our_lr_and_a_checkpoint_keeps_plain_values():
    """Python users pass callables (LightningCLI passes them too, and saves their config): `lr` and
    `weight_decay` are set on the optimizer; a callable is not written into the checkpoint."""
    module = build(DPO, lr=0.02, weight_decay=0.1, optimizer=functools.partial(torch.optim.SGD, lr=1.0, momentum=0.9),
                   lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=5))
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD) and isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    (group,) = optimizer.param_groups
    assert (group["lr"], group["weight_decay"], group["momentum"]) == (0.02, 0.1, 0.9)
    checkpoint = {"hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["hyper_parameters"]["optimizer"] is None and checkpoint["hyper_parameters"]["lr_scheduler"] is None


def test_every_family_refuses_an_unknown_formulation_at_construction():
    """One way to choose: a name from the family's table, by one key (`loss_type`), checked before any model is
    built; the former `loss` key still chooses it, with a deprecation warning."""
    for family, known in ((DPO, "sigmoid"), (ReferenceFree, "simpo"), (Multimodal, "mdpo")):
        with pytest.raises(ValueError, match=rf"{family.__name__}: unknown loss_type 'nope'; use one of \[.*'{known}'"):
            family(backbone=BACKBONE, loss_type="nope")
    for family in (ReferenceFree, Multimodal):
        with pytest.warns(DeprecationWarning, match=r"`loss: nope` is deprecated; write `loss_type: nope`"), \
                pytest.raises(ValueError, match=rf"{family.__name__}: unknown loss_type 'nope'"):
            family(backbone=BACKBONE, loss="nope")


def test_the_former_loss_key_loads_as_loss_type():
    with pytest.warns(DeprecationWarning, match="`loss: copo` is deprecated"):
        module = Multimodal(backbone=BACKBONE, loss="copo")
    assert module.hparams.loss_type == "copo" and module.hparams.loss is None
    assert module.reference_views == ("chosen", "chosen_mprime")
    with pytest.raises(ValueError, match="disagree"), pytest.warns(DeprecationWarning):
        ReferenceFree(backbone=BACKBONE, loss="orpo", loss_type="cpo")


def test_reference_free_rewards_are_length_normalised(batch):
    module = build(ReferenceFree, loss_type="simpo", beta=2.0, gamma=0.5)
    perturb(module)
    _, metrics = module.compute_loss(batch)
    logps = module.policy.logps(batch, ("chosen", "rejected"))
    tokens = module.policy.tokens(batch, ("chosen", "rejected"))
    avg_w = logps["chosen"] / tokens["chosen"]
    avg_l = logps["rejected"] / tokens["rejected"]
    assert torch.allclose(metrics["rewards/chosen"], 2.0 * avg_w.detach(), atol=1e-5)
    assert torch.equal(metrics["rewards/accuracies"], (avg_w > avg_l).float())


# -- image-side terms really use m' ---------------------------------------------------------------


def test_copo_term_uses_mprime(batch):
    module = build(Multimodal, loss_type="copo", beta=0.5)
    perturb(module)

    def run(b):
        module.zero_grad()
        loss, metrics = module.compute_loss(b)
        loss.backward()
        return loss.detach(), grads(module).clone(), metrics

    loss_a, grad_a, _ = run(batch)
    flipped = dataclasses.replace(batch.rejected_images, pixel_values=batch.rejected_images.pixel_values.flip(-1))
    loss_b, grad_b, _ = run(with_mprime(batch, flipped))
    assert not torch.isclose(loss_a, loss_b, atol=1e-5)
    assert not torch.allclose(grad_a, grad_b, atol=1e-6)

    loss_same, grad_same, metrics = run(with_mprime(batch, batch.images))  # m' = m
    assert torch.isclose(loss_same, torch.tensor(LOG2), atol=1e-5)
    assert torch.allclose(metrics["loss/copo"], torch.full((len(batch),), LOG2), atol=1e-5)
    assert torch.allclose(metrics["rewards_img/margins"], torch.zeros(len(batch)), atol=1e-5)
    assert grad_same.abs().max() < 1e-4 * grad_a.abs().max()


def test_mdpo_is_the_weighted_sum_of_its_separate_terms(batch):
    weights = {"dpo_weight": 0.5, "copo_weight": 2.0, "anchor_weight": 0.3}
    module = build(Multimodal, loss_type="mdpo", beta=0.5, delta=0.1, **weights)
    perturb(module)
    loss, metrics = module.compute_loss(batch)
    # recompute each term on its own, from separately scored views
    views = ("chosen", "rejected", "chosen_mprime")
    with torch.no_grad():
        pol = {v: module.policy.logps(batch, (v,))[v] for v in views}
        ref = module.policy.reference_logps(batch, views)
    dpo = dpo_loss(PairLogps(pol["chosen"], pol["rejected"], ref["chosen"], ref["rejected"]), beta=0.5)
    copo = copo_loss(PairLogps(pol["chosen"], pol["chosen_mprime"], ref["chosen"], ref["chosen_mprime"]), beta=0.5)
    anchor = anchor_loss(pol["chosen"], ref["chosen"], beta=0.5, delta=0.1)
    for name, term in (("dpo", dpo), ("copo", copo), ("anchor", anchor)):
        assert torch.allclose(metrics[f"loss/{name}"], term, atol=1e-4), name
    expected = 0.5 * dpo.mean() + 2.0 * copo.mean() + 0.3 * anchor.mean()
    assert torch.isclose(loss.detach(), expected, atol=1e-4)
    # the image term is its own term, not the text term computed again (the released code's bug)
    assert not torch.allclose(metrics["loss/copo"], metrics["loss/dpo"], atol=1e-3)
    assert torch.allclose(metrics["rewards_img/chosen_m"], metrics["rewards/chosen"])
    assert torch.allclose(
        metrics["rewards_img/margins"], metrics["rewards_img/chosen_m"] - metrics["rewards_img/chosen_mprime"]
    )
    # m' = m: the CoPO term is log 2 on every pair
    _, same = module.compute_loss(with_mprime(batch, batch.images))
    assert torch.allclose(same["loss/copo"], torch.full((len(batch),), LOG2), atol=1e-5)


def test_targeted_mixes_dpo_and_copo_per_pair(batch):
    module = build(Multimodal, loss_type="targeted", beta=0.5)
    perturb(module)
    image = batch.image_rejected
    assert module.views_for(batch) == ("chosen", "rejected", "chosen_mprime")
    loss, metrics = module.compute_loss(batch)
    with torch.no_grad():
        views = ("chosen", "rejected", "chosen_mprime")
        pol = module.policy.logps(batch, views)
        ref = module.policy.reference_logps(batch, views)
    dpo = dpo_loss(PairLogps(pol["chosen"], pol["rejected"], ref["chosen"], ref["rejected"]), beta=0.5)
    copo = copo_loss(PairLogps(pol["chosen"], pol["chosen_mprime"], ref["chosen"], ref["chosen_mprime"]), beta=0.5)
    expected = torch.where(image, copo, dpo)
    assert torch.allclose(metrics["loss/dpo"] + metrics["loss/copo"], expected, atol=1e-4)
    assert torch.all(metrics["loss/dpo"][image] == 0) and torch.all(metrics["loss/copo"][~image] == 0)
    assert torch.isclose(loss.detach(), expected.mean(), atol=1e-4)
    # a batch of text pairs only needs no m' at all
    text_only = dataclasses.replace(batch, rejected_images=None, image_rejected=torch.zeros(len(batch), dtype=torch.bool))
    assert module.views_for(text_only) == ("chosen", "rejected")
    loss_text, metrics_text = module.compute_loss(text_only)
    assert torch.isclose(loss_text.detach(), dpo.mean(), atol=1e-4)
    assert set(metrics_text) == set(metrics)  # the same keys whatever the mix (ranks must agree)


# -- MMedPO ---------------------------------------------------------------------------------------


def test_mmedpo_weights_and_mprime(batch):
    module = build(MMedPO, beta=0.5)
    perturb(module)
    loss, metrics = module.compute_loss(batch)
    double, _ = module.compute_loss(dataclasses.replace(batch, weights=2 * batch.weights))
    assert torch.isclose(double, 2 * loss, atol=1e-5)
    assert torch.allclose(metrics["weights"], batch.weights)
    # the rejected side is scored on m'
    other, _ = module.compute_loss(with_mprime(batch, batch.images))
    assert not torch.isclose(other, loss, atol=1e-5)


def test_mmedpo_without_weights_is_an_error_naming_the_records(batch):
    module = build(MMedPO)
    with pytest.raises(ValueError, match="weighted_score") as info:
        module.compute_loss(dataclasses.replace(batch, weights=None))
    assert batch.ids[0] in str(info.value)


# -- KTO ------------------------------------------------------------------------------------------


def test_kto_mismatched_pairs(batch):
    """Row i of the KL batch: the responses of pair i on the prompt and image of pair i+1."""
    kl_batch = batch.mismatched(1)
    for i in range(len(batch)):
        j = (i + 1) % len(batch)
        assert torch.equal(kl_batch.prompt.row(i)["input_ids"], batch.prompt.row(j)["input_ids"])
        assert torch.equal(kl_batch.chosen.row(i)["input_ids"], batch.chosen.row(i)["input_ids"])
        assert torch.equal(kl_batch.images.pixel_values[i], batch.images.pixel_values[j])
        assert torch.equal(kl_batch.rejected_images.pixel_values[i], batch.rejected_images.pixel_values[j])
        assert kl_batch.ids[i] == f"{batch.ids[i]}|{batch.ids[j]}"


def test_kto_loss_matches_the_published_form(batch):
    module = build(KTO, beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    perturb(module)
    loss, metrics = module.compute_loss(batch)
    with torch.no_grad():
        pol = module.policy.logps(batch, ("chosen", "rejected"))
        ref = module.policy.reference_logps(batch, ("chosen", "rejected"))
        kl_batch = batch.mismatched(1)
        z0 = kto_kl_baseline(
            module.policy.logps(kl_batch, ("chosen",))["chosen"],
            module.policy.reference_logps(kl_batch, ("chosen",))["chosen"],
        )
    desirable = torch.cat([torch.ones(len(batch)), torch.zeros(len(batch))]).bool()
    expected = kto_loss(
        torch.cat([pol["chosen"], pol["rejected"]]), torch.cat([ref["chosen"], ref["rejected"]]), desirable, z0,
        beta=0.5, desirable_weight=1.0, undesirable_weight=1.5,
    )
    assert torch.isclose(metrics["kl"], z0, atol=1e-5) and metrics["kl"] >= 0
    assert torch.allclose(metrics["loss/kto"], expected, atol=1e-5)
    assert torch.isclose(loss.detach(), expected.mean(), atol=1e-5)


# -- DPO: bco_pair's running baseline ------------------------------------------------------------------


def test_bco_pair_running_mean_is_a_buffer(batch):
    module = build(DPO, loss_type="bco_pair", beta=0.5)
    perturb(module)
    assert "bco_reward_mean" in module.state_dict()
    assert "bco_reward_mean" not in DPO(backbone=BACKBONE).state_dict()
    module.train()
    _, first = module.compute_loss(batch)
    _, second = module.compute_loss(batch)
    assert int(module.bco_reward_count) == 2
    assert torch.isclose(first["bco/delta"], second["bco/delta"], atol=1e-5)  # same batch, same mean
    expected = torch.cat([first["rewards/chosen"], first["rewards/rejected"]]).mean()
    assert torch.isclose(module.bco_reward_mean, expected, atol=1e-5)
    module.eval()
    module.compute_loss(batch)
    assert int(module.bco_reward_count) == 2  # validation does not move the baseline


# -- TRL's conventions, by name ----------------------------------------------------------------------


def test_trl_conventions_selectable(batch):
    """bco_pair without the running mean (TRL 1.16 DPOTrainer), sigmoid_norm, and TRL's token-mean SFT."""
    module = build(DPO, loss_type="bco_pair", bco_baseline="none", beta=0.5)
    perturb(module)
    assert "bco_reward_mean" not in module.state_dict()
    views = ("chosen", "rejected")
    pol, ref = module.policy.logps(batch, views), module.policy.reference_logps(batch, views)
    loss, metrics = module.compute_loss(batch)
    expected = dpo_loss(PairLogps(pol["chosen"], pol["rejected"], ref["chosen"], ref["rejected"]), beta=0.5, loss_type="bco_pair")
    assert torch.allclose(metrics["loss/dpo"], expected.detach(), atol=1e-5) and "bco/delta" not in metrics

    sft = build(SFT, nll_reduction="token")
    loss, _ = sft.compute_loss(batch)
    logps, tokens = sft.policy.logps(batch, ("chosen",))["chosen"], batch.chosen.lengths
    assert torch.isclose(loss, -logps.sum() / tokens.sum(), atol=1e-5)
    sft.hparams.nll_reduction = "sequence"
    loss_seq, _ = sft.compute_loss(batch)
    assert torch.isclose(loss_seq, (-logps / tokens).mean(), atol=1e-5) and not torch.isclose(loss, loss_seq)


@pytest.mark.parametrize("schedule, at_3_of_10", [("cosine", 0.5 * (1 + math.cos(math.pi * 0.3))), ("linear", 0.7),
                                                  ("constant", 1.0)])
def test_lr_schedules(schedule, at_3_of_10):
    from types import SimpleNamespace

    module = build(SFT, lr=1.0, warmup_ratio=0.0, lr_schedule=schedule)
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(at_3_of_10)
    module._trainer = None


def test_default_adamw_is_the_fused_kernel_and_makes_the_same_update():
    """The default optimizer is torch's fused AdamW on CPU (HF Trainer's default, `adamw_torch_fused`): its update
    equals the per-tensor AdamW's; parameters no fused kernel takes (meta) get the plain one."""
    from types import SimpleNamespace

    from lightning_meddpo.modules.wiring import has_fused_adamw

    module = build(SFT, lr=1e-2, weight_decay=0.1, warmup_ratio=0.0)
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    optimizer = module.configure_optimizers()["optimizer"]
    module._trainer = None
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["fused"] is True
    assert not has_fused_adamw([torch.nn.Parameter(torch.zeros(2, device="meta"))])
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    start = [w.detach().clone() for w in weights]
    fused = torch.optim.AdamW(weights, lr=1e-2, weight_decay=0.1, fused=has_fused_adamw(weights))
    plain = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        for w, c in zip(weights, copies):
            w.grad = torch.full_like(w, 0.5 - step)
            c.grad = w.grad.clone()
        fused.step()
        plain.step()
    for w, c, w0 in zip(weights, copies, start):
        torch.testing.assert_close(w, c, rtol=1e-6, atol=1e-7)
        assert (w - w0).abs().max() > 1e-3  # it moved
