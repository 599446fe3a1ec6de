"""Our preference step against TRL's DPOTrainer on the same vision-language model, data and order.

    pip install -e ".[bench]"            # trl, only for this benchmark
    python benchmarks/vs_trl.py                          # both model shapes, every variant, 2 repeats
    python benchmarks/vs_trl.py --shapes llava_med --variants dpo,dpo_precomputed --steps 12 --repeats 3

Every measurement runs in a fresh process (`--worker`); ours and TRL's alternate, repeat by repeat, so
a machine that slows down slows both. Each process trains `--steps` optimizer steps on the same pairs in
file order (ours: data `shuffle: false`; TRL: `train_sampling_strategy="sequential"`), same batch size,
fp32 (or `--precision bf16`: float32 trainable weights under bf16 autocast, and on both sides the frozen linear
weights stored in bfloat16 as ours stores them, backbones/build.store_frozen_in), no gradient checkpointing (TRL
turns it on by default; off on both sides here), no evaluation, no checkpoints, the same frozen parts (the CLIP layers after LLaVA's feature layer,
which get no gradient, on both sides) and for LoRA the same adapters: each side's trainable parameters are
counted and a variant whose counts differ is reported as not comparable, with no ratio. Both sides get the
same strings: the prompt as our chat template renders it and each response with its end-of-turn, so both
tokenise the same sequences; the first step's loss is printed for each side as a check. TRL's side runs its
fastest settings that work for image data in TRL 1.16: `padding_free` is disabled there ("temporarily
unavailable after a refactor"), `precompute_ref_log_probs` is refused for vision datasets, and its DPOConfig has
no logits-to-keep or Liger option for DPO, so it runs padded batches with the online reference.

Data loading: both sides use the same number of DataLoader workers, by default ours' default (`default_workers`:
none on the CPU, where a worker takes the step's cores; up to 4 with an accelerator), and the same torch threads
(`--threads`, default all cores). `--threads 1 --num-workers 1` stands in for a GPU machine on a CPU: the step
computes on one core, the data is prepared on the other, as workers prepare it beside a GPU.

Reported per side, as medians over repeats: the step time after `--warmup` steps (pairs/s and tokens/s
from it, tokens = prompt + response of chosen and rejected, as TRL counts them), the end-to-end rate over
the same steps with everything between them (data loading, collation, logging: wall time from the start
of the first timed step to the end of the last) and its ratio to the step rate (1.0: the step never waits), and
the process's peak memory (CUDA max allocated on a GPU, else max RSS) and of it the training's own (on the
CPU: less what the process held after its imports, before the model, the interpreter and libraries, which
differ between the two sides), and of the step the
seconds spent in the reference's log-probs (TRL's where the reference is a model of its own, i.e. not under
LoRA). The warmup steps are left out of all: the first step pays one-off costs (Lightning creates its logged
metrics there, ~0.25 s) that do not recur. Variants:

  dpo             full fine-tuning, reference = frozen copy          vs TRL DPOTrainer (ref_model copy)
  dpo_paper       as dpo, vision tower and projector frozen on both    vs TRL DPOTrainer (ref_model copy)
                  sides (the paper's recipe: the language model trains)
  dpo_lora        LoRA r=8 on every linear projection of the language  vs TRL DPOTrainer + peft LoRA, the same
                  model, reference = adapters disabled                 peft.LoraConfig (LORA below)
  dpo_precomputed full fine-tuning, reference computed before step 1 vs TRL online (TRL refuses a
                  (its one-off cost is reported apart)                precomputed reference for images)
  mdpo            DPO + CoPO + anchor (3 views, m' from the record)  vs the same loss scored TRL's way
                                                                     (ours with scoring: logits: one row
                                                                     per view, full logits), TRL has no mDPO

Shapes: `tiny` is the demo backbone (32 px images, 4 image tokens); `llava_med` keeps LLaVA-Med v1.5's
sequence shape (336 px CLIP input, patch 14: 576 image tokens, short answers) on a small Mistral.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "tiny": {"image_size": 32, "patch_size": 16, "text_model": "llama"},
    "llava_med": {"image_size": 336, "patch_size": 14, "text_model": "mistral"},
}
VARIANTS = ("dpo", "dpo_paper", "dpo_lora", "dpo_precomputed", "mdpo")
# dpo_paper: the paper's full fine-tuning, the language model only (LLaVA's frozen CLIP tower, mm_projector_lr 0)
PAPER_FROZEN = ["vision_tower", "projector"]
# LoRA on both sides: every linear projection of the language model (LLaVA's recipe, find_all_linear_names), the
# vision tower and projector excluded (LLaVA's too), through the same LoraSettings -> peft.LoraConfig.
LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


# ---------------------------------------------------------------------------------------------- setup


def prepare(shape: str, root: Path, n_pairs: int) -> tuple[Path, Path]:
    """A tiny LLaVA of the given shape and a demo dataset (every pair with an m'), built once."""
    from lightning_meddpo.demo.synthetic import ensure_demo_dataset
    from lightning_meddpo.demo.tiny import build_tiny_backbone

    model_dir = root / f"model-{shape}"
    if not (model_dir / "config.json").is_file():
        build_tiny_backbone(model_dir, **SHAPES[shape])
    data_dir = root / "data"
    ensure_demo_dataset(data_dir, n_train=n_pairs, n_val=4, n_test=4, seed=0)
    return model_dir, data_dir


def peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return process_peak_rss_mib()


def start_memory_mib() -> float:
    """What the process holds before any model is built (interpreter, torch, the trainer's libraries): subtracted
    from the peak, it leaves the training's own memory. On a GPU 0 (CUDA counts only tensors)."""
    import torch

    if torch.cuda.is_available():
        return 0.0
    return _proc_status_mib("VmRSS") or 0.0


def process_peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM, the high-water mark of its own address space. Not ru_maxrss,
    which on Linux carries over the peak of the process image an exec replaced, i.e. the driver's that forked
    the worker (which made both sides of a comparison read the same number)."""
    peak = _proc_status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in MiB, or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def random_init(module, device: str, dtype) -> None:
    """Make `module` build its policy from its backbone's config with seeded random weights on `device` (a shape
    too large to save, e.g. gpu_check.py's 7B): the same weights as `random_model` gives TRL's side."""
    from lightning_meddpo.backbones.build import prepare_policy_model

    def build_model(self):
        h = self.hparams
        return prepare_policy_model(random_model(h.backbone, device, dtype), h.lora, self.frozen_parts,
                                    h.gradient_checkpointing)

    module.build_model = types.MethodType(build_model, module)


def random_model(model_dir, device: str, dtype):
    """Seeded random weights holding bfloat16 values, as a backbone saved in bfloat16 (published 7B ones are) loads:
    under bf16-mixed its frozen weights are then stored in bfloat16 on both sides (see run_trl)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    return model


# ---------------------------------------------------------------------------------------------- workers


def run_ours(args) -> dict:
    import lightning as L
    import torch

    from lightning_meddpo.cli import TRAINER_DEFAULTS, MedDPOCLI
    from lightning_meddpo.modules.base import PreferenceModule

    start_mib = start_memory_mib()
    _set_threads(args.threads)

    class Timer(L.Callback):
        def __init__(self):
            self.steps, self.losses, self.start = [], [], 0.0
            self.reference = ReferenceClock()

        def on_train_start(self, trainer, pl_module):
            self.begin = time.perf_counter()  # setup (model, data, a precomputed reference) ends here
            pl_module.policy.reference_logps = self.reference.around(pl_module.policy.reference_logps)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync()
            self.start = time.perf_counter()
            self.reference.next_step()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync()
            self.steps.append((self.start, time.perf_counter(), len(batch), batch.sequence_tokens()))
            self.losses.append(float(outputs["loss"]))

    formulation = "configs/formulations/mdpo.yaml" if args.variant == "mdpo" else "configs/formulations/dpo.yaml"
    out = Path(tempfile.mkdtemp(prefix="vs_trl-ours-"))
    cli_args = [
        "--config", str(REPO / formulation), "--config", str(REPO / "configs/backbones/demo.yaml"), f"--seed_everything={args.seed}",
        f"--model.init_args.backbone={args.model_dir}", "--model.init_args.lr=1e-5", "--model.init_args.beta=0.1",
        f"--data.init_args.train_file={args.data_dir / 'train.json'}", f"--data.init_args.val_file={args.data_dir / 'val.json'}",
        f"--data.init_args.test_file={args.data_dir / 'test.json'}", "--data.init_args.demo=false",
        "--data.init_args.shuffle=false", f"--data.init_args.batch_size={args.batch_size}", "--data.init_args.max_length=2048",
        f"--trainer.max_steps={args.steps}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
        f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false",
        f"--trainer.precision={'bf16-mixed' if args.precision == 'bf16' else '32-true'}",
        f"--trainer.accelerator={'gpu' if _cuda() else 'cpu'}", "--trainer.devices=1",
        f"--data.init_args.num_workers={args.num_workers}",
    ]
    if args.variant == "dpo_lora":
        cli_args += [f"--model.init_args.lora={json.dumps(LORA)}"]
    if args.variant == "dpo_paper":
        cli_args += [f"--model.init_args.freeze=[{','.join(PAPER_FROZEN)}]"]
    if args.variant == "dpo_precomputed":
        cli_args += ["--model.init_args.reference=precomputed", f"--model.init_args.reference_cache_dir={out / 'cache'}"]
    if args.scoring:
        cli_args += [f"--model.init_args.scoring={args.scoring}"]
    cli = MedDPOCLI(PreferenceModule, None, subclass_mode_model=True, subclass_mode_data=True,
                    trainer_defaults=TRAINER_DEFAULTS, args=cli_args, run=False, auto_configure_optimizers=False,
                    save_config_callback=None)
    if args.random_init:
        random_init(cli.model, "cuda" if _cuda() else "cpu", torch.float32)
    timer = Timer()
    cli.trainer.callbacks.append(timer)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    result = _summary(timer.steps, args.warmup)
    result.update(first_loss=timer.losses[0], setup_seconds=timer.begin - start, peak_memory_mib=peak_memory_mib(),
                  start_memory_mib=start_mib,
                  trainable_parameters=_trainable(cli.model.policy.model),
                  reference_seconds_median=timer.reference.median(args.warmup))
    del torch
    return result


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lightning_meddpo.backbones.loader import load_processor
    from lightning_meddpo.data.collate import PairEncoder
    from lightning_meddpo.data.records import read_preference_file

    start_mib = start_memory_mib()
    _set_threads(args.threads)
    processor = load_processor(str(args.model_dir))
    encoder = PairEncoder(processor)
    records, _ = read_preference_file(args.data_dir / "train.json")
    rows = []
    for r in records[: args.steps * args.batch_size]:
        prompt = encoder.render_prompt(r.prompt)
        rows.append({
            "prompt": prompt, "chosen": encoder.render_response(r.prompt, prompt, r.chosen),
            "rejected": encoder.render_response(r.prompt, prompt, r.rejected), "images": [Image.open(r.image).convert("RGB")],
        })
    dataset = Dataset.from_list(rows)

    class Timer(TrainerCallback):
        def __init__(self):
            self.steps, self.start = [], 0.0

        def on_step_begin(self, *a, **k):
            _sync()
            self.start = time.perf_counter()
            reference.next_step()

        def on_step_end(self, *a, **k):
            _sync()
            self.steps.append((self.start, time.perf_counter()))

    from lightning_meddpo.backbones.build import (
        LoraSettings,
        freeze_parts,
        freeze_unused_vision_layers,
        store_frozen_in,
    )

    if args.random_init:
        model = random_model(args.model_dir, "cuda" if _cuda() else "cpu", torch.float32)
    else:
        model = AutoModelForImageTextToText.from_pretrained(args.model_dir, dtype=torch.float32)
    freeze_unused_vision_layers(model)  # as ours: the CLIP layers after vision_feature_layer never get a gradient
    if args.variant == "dpo_paper":
        freeze_parts(model, PAPER_FROZEN)  # the same parameters ours freezes (requires_grad off)
    peft_config = LoraSettings(**LORA).peft_config(model) if args.variant == "dpo_lora" else None
    out = tempfile.mkdtemp(prefix="vs_trl-trl-")
    config = DPOConfig(
        output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=1e-5,
        beta=0.1, loss_type=["sigmoid"], max_length=None, gradient_checkpointing=False, logging_steps=1,
        report_to=[], save_strategy="no", eval_strategy="no", train_sampling_strategy="sequential",
        bf16=args.precision == "bf16", use_cpu=not _cuda(), seed=args.seed, dataloader_num_workers=args.num_workers,
        lr_scheduler_type="cosine", warmup_steps=0.03, disable_tqdm=True,
    )
    timer, reference = Timer(), ReferenceClock()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor,
                         peft_config=peft_config, callbacks=[timer])
    if args.precision == "bf16":  # the frozen weights stored as ours stores them under bf16-mixed (the same values;
        # what a TRL user gets from a bf16-saved model loaded in bfloat16, peft keeping its adapters in float32)
        store_frozen_in(trainer.model, torch.bfloat16)
        if trainer.ref_model is not None:
            store_frozen_in(trainer.ref_model, torch.bfloat16, exact_only=False)
    losses = []
    trainer.add_callback(type("L", (TrainerCallback,), {"on_log": lambda self, a, s, c, logs=None, **k: losses.append(logs)})())
    if trainer.ref_model is not None:  # full fine-tuning: the reference is its own model; under LoRA it is not apart
        trainer.ref_model.forward = reference.around(trainer.ref_model.forward)
    trainer.train()
    tokens = []
    for i in range(args.steps):
        batch = rows[i * args.batch_size : (i + 1) * args.batch_size]
        enc = trainer.data_collator([dict(r, images=list(r["images"])) for r in batch])
        tokens.append(int(enc["attention_mask"].sum()))
    steps = [(a, b, args.batch_size, t) for (a, b), t in zip(timer.steps, tokens)]
    result = _summary(steps, args.warmup)
    first = next((float(log["loss"]) for log in losses if log and "loss" in log), None)
    result.update(first_loss=first, setup_seconds=None, peak_memory_mib=peak_memory_mib(), start_memory_mib=start_mib,
                  trainable_parameters=_trainable(trainer.model),
                  reference_seconds_median=reference.median(args.warmup) if trainer.ref_model is not None else None)
    return result


class ReferenceClock:
    """Seconds spent in the reference's log-probs, per optimizer step (wrap the reference call with `around`)."""

    def __init__(self):
        self.per_step: list[float] = []

    def next_step(self) -> None:
        self.per_step.append(0.0)

    def around(self, fn):
        def timed(*args, **kwargs):
            _sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync()
            if self.per_step:
                self.per_step[-1] += time.perf_counter() - start
            return out

        return timed

    def median(self, warmup: int) -> float | None:
        timed = self.per_step[warmup:]
        return statistics.median(timed) if timed else None


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _summary(steps: list[tuple[float, float, int, int]], warmup: int) -> dict:
    """steps: (start, end, pairs, tokens) of every optimizer step; the first `warmup` are left out."""
    timed = steps[warmup:]
    seconds = sum(end - start for start, end, _, _ in timed)
    pairs = sum(n for _, _, n, _ in timed)
    return {
        "step_seconds_median": statistics.median(end - start for start, end, _, _ in timed),
        "pairs_per_second": pairs / seconds,
        "tokens_per_second": sum(t for _, _, _, t in timed) / seconds,
        "end_to_end_pairs_per_second": pairs / (timed[-1][1] - timed[0][0]),
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def default_num_workers() -> int:
    """Ours' default for one training process on this machine (data.datamodule.default_workers), for both sides."""
    from types import SimpleNamespace

    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    from lightning_meddpo.data.datamodule import default_workers

    accelerator = CUDAAccelerator() if _cuda() else CPUAccelerator()
    return default_workers(SimpleNamespace(accelerator=accelerator, num_devices=1))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- driver


def worker_command(side: str, variant: str, model_dir: Path, data_dir: Path, a, scoring: str | None = None) -> list[str]:
    cmd = [sys.executable, __file__, "--worker", side, "--variant", variant, "--model-dir", str(model_dir),
           "--data-dir", str(data_dir), "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch-size",
           str(a.batch_size), "--precision", a.precision, "--seed", str(a.seed), "--num-workers", str(a.num_workers)]
    cmd += ["--threads", str(a.threads)] if a.threads else []
    return cmd + (["--scoring", scoring] if scoring else [])


def run_worker(cmd: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def _training_mib(result: dict) -> float:
    return result["peak_memory_mib"] - result["start_memory_mib"]


def _of_step(result: dict) -> float:
    """End-to-end rate over the step rate (both over the same steps): 1.0 where nothing between steps waits."""
    return result["end_to_end_pairs_per_second"] / result["pairs_per_second"]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def median_of(results: list[dict]) -> dict:
    keys = [k for k, v in results[0].items() if isinstance(v, (int, float)) and v is not None]
    return {k: statistics.median(r[k] for r in results if r.get(k) is not None) for k in keys}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--variant", default="dpo", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--scoring", default=None, help=argparse.SUPPRESS)
    p.add_argument("--random-init", action="store_true", help=argparse.SUPPRESS)  # model from config.json, seeded
    p.add_argument("--shapes", default="tiny,llava_med", help="model shapes: tiny, llava_med")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the step time")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="fresh-process runs per side (medians reported)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads of each side's process (default: all cores)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers on both sides (default: ours' default on this machine, default_workers)")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "lightning_meddpo_vs_trl")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    a = p.parse_args(argv)
    if a.num_workers is None:
        a.num_workers = default_num_workers()
    if a.worker:
        result = run_ours(a) if a.worker == "ours" else run_trl(a)
        print(json.dumps(result))
        return [result]
    rows = []
    for shape in a.shapes.split(","):
        model_dir, data_dir = prepare(shape, a.work_dir, a.steps * a.batch_size)
        for variant in a.variants.split(","):
            if variant not in VARIANTS:
                raise SystemExit(f"unknown variant {variant!r}; known: {VARIANTS}")
            # the baseline: TRL, or for mdpo (which TRL lacks) the same loss scored TRL's way
            base = (("ours", "logits") if variant == "mdpo" else ("trl", None))
            runs: dict[str, list[dict]] = {"ours": [], "base": []}
            for _ in range(a.repeats):
                runs["ours"].append(run_worker(worker_command("ours", variant, model_dir, data_dir, a)))
                runs["base"].append(run_worker(worker_command(base[0], variant, model_dir, data_dir, a, base[1])))
            ours, theirs = median_of(runs["ours"]), median_of(runs["base"])
            if ours["trainable_parameters"] != theirs["trainable_parameters"]:
                print(f"{shape} {variant}: not comparable, no ratio reported: {ours['trainable_parameters']} trainable "
                      f"parameters here, {theirs['trainable_parameters']} in the baseline", flush=True)
                continue
            row = {
                "shape": shape, "variant": variant, "baseline": "TRL DPOTrainer" if base[0] == "trl" else "ours, scoring: logits",
                "ours": ours, "baseline_result": theirs,
                "step_speedup": theirs["step_seconds_median"] / ours["step_seconds_median"],
                "end_to_end_speedup": ours["end_to_end_pairs_per_second"] / theirs["end_to_end_pairs_per_second"],
                "end_to_end_of_step": (_of_step(ours), _of_step(theirs)),
                "memory_ratio": ours["peak_memory_mib"] / theirs["peak_memory_mib"],
                "training_memory_ratio": _training_mib(ours) / _training_mib(theirs),
                "first_loss": (ours.get("first_loss"), theirs.get("first_loss")),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"torch threads: {a.threads or 'all cores'}; DataLoader workers (both sides): {a.num_workers}; precision: {a.precision}")
    print("| shape | variant | baseline | trainable params (both) | step s (ours / base) | of it reference s (ours / base) "
          "| step speed-up | end-to-end speed-up | end to end / step rate (ours / base) | peak MiB (ours / base) "
          "| of it training MiB (ours / base) | first loss (ours / base) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, b = r["ours"], r["baseline_result"]
        print(f"| {r['shape']} | {r['variant']} | {r['baseline']} | {o['trainable_parameters']:,} "
              f"| {o['step_seconds_median']:.3f} / {b['step_seconds_median']:.3f} "
              f"| {_seconds(o.get('reference_seconds_median'))} / {_seconds(b.get('reference_seconds_median'))} "
              f"| {r['step_speedup']:.2f}x | {r['end_to_end_speedup']:.2f}x "
              f"| {r['end_to_end_of_step'][0]:.2f} / {r['end_to_end_of_step'][1]:.2f} | {o['peak_memory_mib']:.0f} / {b['peak_memory_mib']:.0f} "
              f"| {_training_mib(o):.0f} / {_training_mib(b):.0f} "
              f"| {r['first_loss'][0]:.4f} / {r['first_loss'][1]:.4f} |")
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
