"""`plan`: its prediction against measured peaks, its arithmetic, the command; benchmarks/gpu_check.py --tiny."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig

from lightning_meddpo.backbones.build import LoraSettings
from lightning_meddpo.backbones.loader import resolve_backbone
from lightning_meddpo.plan import Planner, Settings, Workload, meta_model
from tests.conftest import REPO, run_cli

sys.path.insert(0, str(REPO / "benchmarks"))


def data_args(demo_dir) -> list[str]:
    return [f"--data.init_args.train_file={demo_dir / 'train.json'}", f"--data.init_args.val_file={demo_dir / 'val.json'}",
            f"--data.init_args.test_file={demo_dir / 'test.json'}", "--data.init_args.demo=false"]


@pytest.mark.parametrize("extra", [
    [],  # full fine-tuning, float32, copy reference
    ['--model.init_args.lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}',
     "--model.init_args.gradient_checkpointing=true", "--trainer.precision=bf16-mixed"],
], ids=["full_fp32", "lora_checkpointed_bf16"])
def test_the_plan_is_within_20_percent_of_a_measured_training_step(demo_dir, extra):
    from plan_accuracy import measure

    result = measure(["configs/formulations/dpo.yaml", "configs/backbones/demo.yaml"],
                     [*data_args(demo_dir), "--data.init_args.batch_size=4", *extra])
    assert result["measured_peak_mib"] > 0
    assert 0.8 <= result["ratio"] <= 1.2, result


@pytest.fixture(scope="module")
def tiny_config():
    return AutoConfig.from_pretrained(resolve_backbone("tiny://llama"))


def test_sharding_divides_what_each_device_holds_and_the_reference_follows_the_strategy(tiny_config):
    work = Workload(rows=4, row_tokens=64, images=4, response_tokens=64)
    single = Planner(tiny_config, Settings(precision="32-true", strategy="ddp", devices=4)).plan(work)
    sharded = Planner(tiny_config, Settings(precision="32-true", strategy="fsdp2", devices=4)).plan(work)
    assert single.weights == single.parameters * 4 and single.reference == single.weights
    assert single.gradients == single.trainable_parameters * 4 and single.optimizer == 2 * single.gradients
    assert sharded.weights == single.weights // 4 and sharded.optimizer == single.optimizer // 4
    assert sharded.activations == single.activations and sharded.unsharded_layers > 0
    lora = Planner(tiny_config, Settings(precision="bf16-true", lora=LoraSettings(r=4))).plan(work)
    assert lora.reference == 0 and lora.trainable_parameters < single.trainable_parameters / 10
    assert lora.weights == lora.parameters * 2  # bf16-true: two bytes a weight
    precomputed = Planner(tiny_config, Settings(reference="precomputed")).plan(work)
    assert precomputed.reference == 0 and any("cached on disk" in n for n in precomputed.notes)


def test_activations_grow_with_the_rows_and_checkpointing_keeps_less(tiny_config):
    planner = Planner(tiny_config, Settings(precision="32-true"))
    small = planner.plan(Workload(rows=2, row_tokens=64, images=2, response_tokens=32))
    large = planner.plan(Workload(rows=8, row_tokens=64, images=8, response_tokens=128))
    assert large.activations > 3 * small.activations
    assert large.peak > small.peak
    planner.settings.gradient_checkpointing = True
    assert planner.plan(Workload(rows=8, row_tokens=64, images=8, response_tokens=128)).activations < large.activations
    # a smaller device fits a smaller batch
    of = lambda b: Workload(rows=b, row_tokens=64, images=b, response_tokens=32 * b)  # noqa: E731
    assert planner.largest_batch(of, 0.01) < planner.largest_batch(of, 0.1)


def test_plan_command_reads_the_fit_configs():
    proc = run_cli("plan", "--config", "configs/formulations/mdpo.yaml", "--config", "configs/backbones/demo.yaml",
                   "--strategy", "fsdp2", "--devices", "2", "--gpu_gib", "1", "--json", "true")
    r = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert r["module"] == "Multimodal" and r["views"] == ["chosen", "rejected", "chosen_mprime"]
    assert r["settings"]["precision"] == "32-true" and r["settings"]["devices"] == 2  # the config's precision
    assert r["batch_size"] == 8 and r["workload"]["rows"] == 2 * 8  # mDPO: a row on m and a row on m' per pair
    plain, ckpt = r["plain"], r["checkpointing"]
    assert plain["weights"] == plain["parameters"] * 4 // 2  # float32 weights over 2 devices
    assert ckpt["activations"] < plain["activations"] and ckpt["largest_batch"] >= plain["largest_batch"] > 8


def test_published_shapes_have_the_released_sizes():
    from lightning_meddpo.plan import meta_model, parameter_counts, published_config

    total, trainable = parameter_counts(meta_model(published_config("llava_med_7b")))
    assert math.isclose(total / 1e9, 7.567, abs_tol=1e-3)  # Mistral-7B (32,064 tokens) + CLIP-L/336 + projector
    total, _ = parameter_counts(meta_model(published_config("huatuo_7b")))
    assert math.isclose(total / 1e9, 7.936, abs_tol=1e-3)  # Qwen2-7B + the same CLIP


@pytest.mark.parametrize("backbone, shape", [("llava_med", "llava_med_7b"), ("huatuo", "huatuo_7b")])
def test_paper_configs_train_the_language_model_only(capsys, backbone, shape):
    """The paper's recipe (LLaVA's frozen CLIPVisionTower, its scripts' mm_projector_lr 0): the backbone configs
    freeze the vision tower and the projector; what trains is the language model, LM head included."""
    from lightning_meddpo.cli import main
    from lightning_meddpo.plan import meta_model, published_config

    main(["plan", "--config", "configs/formulations/dpo.yaml", "--config", f"configs/backbones/{backbone}.yaml",
          "--shape", shape, "--json", "true"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["settings"]["freeze"] == ["vision_tower", "projector"]
    model = meta_model(published_config(shape))
    language = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    assert plan["plain"]["trainable_parameters"] == language


def test_plan_command_refuses_a_backbone_it_cannot_find(capsys):
    from lightning_meddpo.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["plan", "--config", "configs/formulations/dpo.yaml", "--config", "configs/backbones/llava_med.yaml"])
    assert exit.value.code == 2
    assert "/path/to/llava-med-v1.5-mistral-7b-hf: no such directory" in capsys.readouterr().err


def test_gpu_check_runs_on_the_cpu_with_tiny(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--cases",
                           "lora_fsdp2_ckpt", "--steps", "3", "--warmup", "1", "--work-dir", str(tmp_path), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    (case,) = result["cases"]
    assert "error" not in case, case
    assert case["strategy"] == "fsdp2" and case["checkpointing"] and case["lora"]
    assert case["steps_timed"] == 2 and case["pairs_per_second"] > 0 and case["planned_peak_gib"] > 0
    assert math.isclose(case["first_loss"], math.log(2), abs_tol=1e-4)  # policy == reference at step 1
    assert "lora_fsdp2_ckpt" in proc.stdout  # the table


def test_bf16_mixed_plans_frozen_linear_weights_in_bf16_where_the_backbone_is_saved_in_it(tiny_config):
    """The copy reference's linear weights always, LoRA's frozen base only for a backbone saved in bfloat16: two
    bytes a value, and no autocast copies of them among the activations."""
    work = Workload(rows=4, row_tokens=64, images=4, response_tokens=64)
    full = Planner(tiny_config, Settings(precision="bf16-mixed", saved_dtype="float32")).plan(work)
    linear = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                 for m in meta_model(tiny_config).modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    assert full.weights == full.parameters * 4  # trains: float32
    assert full.reference == (full.parameters - linear) * 4 + linear * 2
    fp32 = Planner(tiny_config, Settings(precision="32-true")).plan(work)
    assert fp32.reference == fp32.weights

    lora = LoraSettings(r=4)
    kept = Planner(tiny_config, Settings(precision="bf16-mixed", lora=lora, saved_dtype="float32"))
    stored = Planner(tiny_config, Settings(precision="bf16-mixed", lora=lora, saved_dtype="bfloat16"))
    a, b = kept.plan(work), stored.plan(work)
    frozen_linear = stored.stored
    assert frozen_linear > 0 and kept.stored == 0
    assert a.weights - b.weights == frozen_linear * 2
    assert stored.text.once < kept.text.once  # autocast's per-forward bf16 copies of the frozen base are gone
    assert b.activations < a.activations and b.peak < a.peak
    assert any("kept in float32" in n for n in a.notes) and any("frozen linear weights in" in n for n in b.notes)
    fsdp1 = Planner(tiny_config, Settings(precision="bf16-mixed", strategy="fsdp", devices=2, lora=lora,
                                          saved_dtype="bfloat16"))
    assert fsdp1.stored == 0  # FSDPStrategy flattens a layer's parameters into one dtype: nothing stored


def test_the_plan_follows_a_bf16_saved_backbone_within_20_percent(demo_dir, bf16_backbone):
    """A LoRA run under bf16-mixed on a backbone saved in bfloat16 (its frozen base stored so): planned as measured."""
    from plan_accuracy import measure

    result = measure(["configs/formulations/dpo.yaml", "configs/backbones/demo.yaml"],
                     [*data_args(demo_dir), "--data.init_args.batch_size=4", f"--model.init_args.backbone={bf16_backbone}",
                      '--model.init_args.lora={"r": 4, "alpha": 8}', "--trainer.precision=bf16-mixed"])
    assert result["measured_peak_mib"] > 0
    assert 0.8 <= result["ratio"] <= 1.2, result
