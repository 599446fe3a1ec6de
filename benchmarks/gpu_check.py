"""The GPU check: our DPO step on a LLaVA-Med-shaped 7B model, on one GPU, in a few minutes, no download.

    python benchmarks/gpu_check.py                 # one H100/H200: the cases below, then TRL if installed
    python benchmarks/gpu_check.py --tiny          # the same code on the CPU, tiny shape (CI runs this)
    python benchmarks/gpu_check.py --cases lora_fsdp2,full_fsdp2_ckpt --steps 8 --out results.json

The model has LLaVA-Med v1.5's architecture and dimensions (Mistral-7B text model, CLIP ViT-L/14 at 336 px,
576 image tokens: lightning_meddpo.plan.published_config("llava_med_7b")) with random weights holding bfloat16
values (as a backbone saved in bf16 loads), built directly on the device (`from_config` under the device, seeded)
in place of `from_pretrained`; everything else is the real `fit`: the CLI, the demo preference data (its images are
resized to 336 px; its answers are short), the packed scoring, the copy or adapter reference, the strategy. Each
case runs in a fresh process:

  lora_fsdp2 / lora_fsdp2_ckpt  LoRA r=8 on every projection of the language model (adapter reference), bf16-mixed
                                (float32 weights, bf16 autocast), FSDP2 (ModelParallelStrategy) on 1 GPU,
                                activation checkpointing off / on
  full_fsdp2 / full_fsdp2_ckpt  full fine-tuning with a frozen copy as the reference, bf16-true (bf16 weights and
                                AdamW states: the float32 ones of bf16-mixed need ~165 GiB, see `plan`), FSDP2,
                                checkpointing off / on
  full_fsdp_ckpt                the same under Lightning's FSDPStrategy (FSDP1, configs/strategies/fsdp.yaml's
                                wrap policy), checkpointing on (GPU only: FSDPStrategy refuses the CPU)
  lora_single / full_single     (only when named in --cases) lora_fsdp2 / full_fsdp2 without FSDP: what sharding
                                on one device costs

For each: the median step time after `--warmup` steps, pairs/s and tokens/s (prompt and both responses,
padding excluded), the peak memory (CUDA max allocated; on the CPU the process's peak RSS) and `plan`'s
prediction for the same settings and the largest batch the run saw. With `trl` installed (and not --tiny),
benchmarks/vs_trl.py's workers then run TRL's DPOTrainer and ours on the same randomly initialised model, LoRA,
batch and bf16 autocast, each in its own process. On a GPU it also checks that the digests a checkpoint keeps of
the weights it leaves out (checkpoints.values_digest) come out the same on the GPU as on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
CASES = {
    "lora_fsdp2": {"lora": True, "precision": "bf16-mixed", "strategy": "fsdp2", "checkpointing": False},
    "lora_fsdp2_ckpt": {"lora": True, "precision": "bf16-mixed", "strategy": "fsdp2", "checkpointing": True},
    "full_fsdp2": {"lora": False, "precision": "bf16-true", "strategy": "fsdp2", "checkpointing": False},
    "full_fsdp2_ckpt": {"lora": False, "precision": "bf16-true", "strategy": "fsdp2", "checkpointing": True},
    "full_fsdp_ckpt": {"lora": False, "precision": "bf16-true", "strategy": "fsdp", "checkpointing": True},
    "lora_single": {"lora": True, "precision": "bf16-mixed", "strategy": "single", "checkpointing": False},
    "full_single": {"lora": False, "precision": "bf16-true", "strategy": "single", "checkpointing": False},
}
DEFAULT_CASES = ("lora_fsdp2", "lora_fsdp2_ckpt", "full_fsdp2", "full_fsdp2_ckpt", "full_fsdp_ckpt")
STRATEGY_CONFIGS = {"fsdp2": ["configs/strategies/fsdp2.yaml"], "fsdp": ["configs/strategies/fsdp.yaml"], "single": []}


# ---------------------------------------------------------------------------------------------- setup


def prepare(root: Path, tiny: bool, pairs: int) -> tuple[Path, Path]:
    """A backbone directory (config.json of the shape, the demo processor at 336 px or the tiny one's) and the
    demo data. The directory's weights are never read: the workers build the model from its config."""
    from transformers import AutoConfig

    from lightning_meddpo.demo.synthetic import ensure_demo_dataset
    from lightning_meddpo.demo.tiny import build_tiny_backbone
    from lightning_meddpo.plan import published_config

    model_dir = root / ("model-tiny" if tiny else "model-llava_med_7b")
    if not (model_dir / "config.json").is_file():
        size = {"image_size": 32, "patch_size": 16} if tiny else {"image_size": 336, "patch_size": 14}
        build_tiny_backbone(model_dir, text_model="mistral", warm_start_steps=0, **size)
        if not tiny:
            small = AutoConfig.from_pretrained(model_dir)
            config = published_config("llava_med_7b")
            config.image_token_index = small.image_token_index
            for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
                setattr(config.text_config, key, getattr(small.text_config, key))
            config.save_pretrained(model_dir)
            (model_dir / "model.safetensors").unlink(missing_ok=True)
    data_dir = root / "data"
    ensure_demo_dataset(data_dir, n_train=pairs, n_val=4, n_test=4, seed=0)
    return model_dir, data_dir


# ---------------------------------------------------------------------------------------------- a case


def run_case(args) -> dict:
    import lightning as L
    import torch

    from lightning_meddpo.cli import TRAINER_DEFAULTS, MedDPOCLI
    from lightning_meddpo.modules.base import PreferenceModule
    from lightning_meddpo.plan import Planner, settings_of, workload_of
    from vs_trl import _sync, process_peak_rss_mib, random_init

    case = CASES[args.case]
    cuda = torch.cuda.is_available()
    out = Path(tempfile.mkdtemp(prefix=f"gpu_check-{args.case}-"))
    configs = ["configs/formulations/dpo.yaml", "configs/backbones/demo.yaml", *STRATEGY_CONFIGS[case["strategy"]]]
    cli_args = [a for c in configs for a in ("--config", str(REPO / c))] + [
        f"--model.init_args.backbone={args.model_dir}", "--model.init_args.lr=1e-5",
        f"--model.init_args.gradient_checkpointing={str(case['checkpointing']).lower()}",
        f"--data.init_args.train_file={args.data_dir / 'train.json'}", f"--data.init_args.val_file={args.data_dir / 'val.json'}",
        f"--data.init_args.test_file={args.data_dir / 'test.json'}", "--data.init_args.demo=false",
        "--data.init_args.shuffle=false", f"--data.init_args.batch_size={args.batch_size}", "--data.init_args.max_length=2048",
        f"--trainer.max_steps={args.steps}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
        f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false", f"--trainer.precision={case['precision']}",
        f"--trainer.accelerator={'gpu' if cuda else 'cpu'}", "--trainer.devices=1",
    ]
    if case["lora"]:
        cli_args.append(f"--model.init_args.lora={json.dumps(LORA)}")
    cli = MedDPOCLI(PreferenceModule, None, subclass_mode_model=True, subclass_mode_data=True,
                    trainer_defaults=TRAINER_DEFAULTS, args=cli_args, run=False, auto_configure_optimizers=False,
                    save_config_callback=None)
    weights = torch.bfloat16 if case["precision"] == "bf16-true" else torch.float32
    random_init(cli.model, "cuda" if cuda else "cpu", weights)

    class Steps(L.Callback):
        def __init__(self):
            self.times, self.batches, self.losses, self.start = [], [], [], 0.0

        def on_train_start(self, trainer, pl_module):
            self.setup_peak = torch.cuda.max_memory_allocated() if cuda else 0  # model, reference, sharding
            self.step_peaks, self.marks = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                self.marks.append({"step_start": torch.cuda.memory_allocated(),
                                   "weights_grads_states": _resident_bytes(pl_module, trainer.optimizers)})
            self.start = time.perf_counter()

        def _mark(self, name):
            if cuda:
                self.marks[-1][name] = torch.cuda.memory_allocated()
                self.marks[-1][name + "_peak"] = torch.cuda.max_memory_allocated()

        def on_before_backward(self, trainer, pl_module, loss):
            self._mark("before_backward")

        def on_after_backward(self, trainer, pl_module):
            self._mark("after_backward")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self._mark("before_optimizer_step")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync()
            self.times.append(time.perf_counter() - self.start)
            self.batches.append(batch)
            self.losses.append(float(outputs["loss"]))
            self.step_peaks.append(torch.cuda.max_memory_allocated() if cuda else 0)
            self._mark("step_end")

    steps = Steps()
    cli.trainer.callbacks.append(steps)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    timed = list(zip(steps.times, steps.batches))[args.warmup:]
    seconds = sum(t for t, _ in timed)
    module = cli.model
    largest = max((workload_of(b, module.views) for b in steps.batches), key=lambda w: w.rows * w.row_tokens)
    plan = Planner(module.policy.model.config, settings_of(module, cli.trainer)).plan(largest)
    measured = max(steps.step_peaks) if cuda else process_peak_rss_mib() * 2**20
    return {
        "case": args.case, **case, "device": torch.cuda.get_device_name() if cuda else f"cpu x{os.cpu_count()}",
        "steps_timed": len(timed), "step_seconds_median": statistics.median(t for t, _ in timed),
        "pairs_per_second": sum(len(b) for _, b in timed) / seconds,
        "tokens_per_second": sum(b.sequence_tokens() for _, b in timed) / seconds,
        "peak_memory_gib": measured / 2**30, "peak_memory_kind": "cuda_max_allocated_in_a_step" if cuda else "process_peak_rss",
        "setup_peak_gib": steps.setup_peak / 2**30,
        "memory_marks_gib": [{k: round(v / 2**30, 2) for k, v in m.items()} for m in steps.marks[-2:]],
        "planned_peak_gib": plan.peak / 2**30, "trainable_parameters": plan.trainable_parameters,
        "parameters": plan.parameters, "first_loss": steps.losses[0], "last_loss": steps.losses[-1],
    }


def _resident_bytes(module, optimizers) -> int:
    """Bytes of the module's weights, their gradients and the optimizers' states (local shards; each storage once)."""
    import torch

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    tensors = [*module.parameters(), *(p.grad for p in module.parameters() if p.grad is not None)]
    tensors += [v for o in optimizers for state in o.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {}
    for t in tensors:
        st = local(t).untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


# ---------------------------------------------------------------------------------------------- driver


def run_worker(cmd: list[str], timeout: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "TRANSFORMERS_VERBOSITY": "error"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ['no output']}",
                "stderr_tail": proc.stderr[-3000:]}
    return json.loads(lines[-1])


def trl_comparison(args, model_dir: Path, data_dir: Path) -> list[dict]:
    """TRL's DPOTrainer and ours on the same random model, LoRA, batches and bf16 autocast (benchmarks/vs_trl.py's
    workers, each in a fresh process)."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return [{"trl": "not installed: skipped (pip install -e '.[bench]')"}]
    vs_trl = REPO / "benchmarks" / "vs_trl.py"
    rows = []
    for side in ("ours", "trl"):
        cmd = [sys.executable, str(vs_trl), "--worker", side, "--variant", "dpo_lora", "--model-dir", str(model_dir),
               "--data-dir", str(data_dir), "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size",
               str(args.batch_size), "--precision", "bf16", "--seed", "0", "--random-init"]
        rows.append({"side": side, **run_worker(cmd, args.case_timeout)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny shape on the CPU (what CI runs)")
    p.add_argument("--cases", default=None, help=f"comma-separated, of: {', '.join(CASES)} (default: all that the "
                   "device can run)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--case-timeout", type=float, default=240, help="seconds before a case is stopped")
    p.add_argument("--trl", action=argparse.BooleanOptionalAction, default=True, help="run the TRL comparison")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "lightning_meddpo_gpu_check")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        result = run_case(args)
        print(json.dumps(result))
        return result
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    import torch

    cuda = torch.cuda.is_available()
    model_dir, data_dir = prepare(args.work_dir, args.tiny, max(16, args.steps * args.batch_size))
    names = args.cases.split(",") if args.cases else [n for n in DEFAULT_CASES if cuda or CASES[n]["strategy"] != "fsdp"]
    results = {"device": torch.cuda.get_device_name() if cuda else f"cpu x{os.cpu_count()}",
               "shape": "tiny" if args.tiny else "llava_med_7b", "torch": torch.__version__, "cases": [],
               "digest_cpu_equals_gpu": digests_agree() if cuda else None}
    for name in names:
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}; known: {', '.join(CASES)}")
        cmd = [sys.executable, __file__, "--case", name, "--model-dir", str(model_dir), "--data-dir", str(data_dir),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
        start = time.perf_counter()
        row = {"case": name, **run_worker(cmd, args.case_timeout), "wall_seconds": time.perf_counter() - start}
        results["cases"].append(row)
        print(json.dumps(row), flush=True)
    if args.trl and not args.tiny:
        results["trl"] = trl_comparison(args, model_dir, data_dir)
        for row in results["trl"]:
            print(json.dumps(row), flush=True)
    print(render(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results


def digests_agree() -> bool:
    """Whether checkpoints.values_digest gives the same number on the GPU as on the CPU (a checkpoint's left-out
    weights are digested where the model is when it saves, checked where it is when it loads), for float32 and
    bfloat16 tensors of several chunks."""
    import torch

    from lightning_meddpo.checkpoints import values_digest

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 1 << 22, generator=g), torch.randn(4096, 1000, generator=g).bfloat16()]
    return all(values_digest(t) == values_digest(t.cuda()) for t in tensors)


def render(results: dict) -> str:
    lines = [f"{results['shape']} on {results['device']} (torch {results['torch']})"
             + ("" if results.get("digest_cpu_equals_gpu") is None else
                f"; weight digests CPU = GPU: {results['digest_cpu_equals_gpu']}"),
             f"{'case':18}{'step s':>8}{'pairs/s':>9}{'tokens/s':>10}{'peak GiB':>10}{'plan GiB':>10}"]
    for r in results["cases"]:
        if "error" in r:
            lines.append(f"{r['case']:18}  failed: {r['error']}")
            continue
        lines.append(f"{r['case']:18}{r['step_seconds_median']:>8.3f}{r['pairs_per_second']:>9.2f}"
                     f"{r['tokens_per_second']:>10.0f}{r['peak_memory_gib']:>10.2f}{r['planned_peak_gib']:>10.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
