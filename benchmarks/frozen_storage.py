"""What storing frozen weights in bf16 under bf16-mixed saves (backbones/build.store_frozen_in), measured.

    python benchmarks/frozen_storage.py                    # LoRA, bf16-mixed, a ~110M LLaVA saved in bfloat16
    python benchmarks/frozen_storage.py --hidden 512 --layers 4 --full   # also full fine-tuning (copy reference)

Builds a LLaVA-shaped model (CLIP + Mistral, `--hidden`, `--layers`) and saves it in bfloat16, as published 7B
backbones are; then trains DPO through the real `fit` twice per case, with the frozen weights stored in bf16 (the
default) and kept in float32 (the module's storing switched off), and prints for each the peak of live tensor
memory during the last step (benchmarks/plan_accuracy.py's count, as CUDA's allocator counts) and `plan`'s
prediction for the default (stored). That storing changes no value the forward computes is tested
(tests/test_frozen_storage.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_meddpo.modules.base import PreferenceModule  # noqa: E402


def backbone(root: Path, hidden: int, layers: int) -> Path:
    from transformers import AutoModelForImageTextToText

    from lightning_meddpo.demo.tiny import build_tiny_backbone

    out = build_tiny_backbone(root / "model", text_model="mistral", hidden_size=hidden, num_layers=layers,
                              warm_start_steps=0)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(out)
    return out


def run(model_dir: Path, data: Path, extra: list[str], store: bool) -> dict:
    from plan_accuracy import measure

    original = PreferenceModule.store_frozen_in_compute_dtype
    if not store:
        PreferenceModule.store_frozen_in_compute_dtype = lambda self: None
    try:
        return measure(["configs/formulations/dpo.yaml", "configs/backbones/demo.yaml"], [
            f"--data.init_args.train_file={data / 'train.json'}", f"--data.init_args.val_file={data / 'val.json'}",
            "--data.init_args.test_file=null", "--data.init_args.demo=false", "--data.init_args.batch_size=4",
            f"--model.init_args.backbone={model_dir}", "--trainer.precision=bf16-mixed", *extra], steps=2)
    finally:
        PreferenceModule.store_frozen_in_compute_dtype = original


def model_and_data(description: str, full: str, argv: list[str] | None) -> tuple[argparse.Namespace, Path, Path]:
    """The command line (--hidden, --layers, --full: `full`) and, in a new temporary folder, the bf16-saved model
    of that shape and a small demo dataset: (arguments, model directory, data directory)."""
    from lightning_meddpo.demo.synthetic import generate_demo_dataset

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--full", action="store_true", help=full)
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="lightning_meddpo-bench-"))
    return args, backbone(root, args.hidden, args.layers), generate_demo_dataset(root / "data", n_train=16, n_val=4, n_test=4)["root"]


def main(argv: list[str] | None = None) -> list[dict]:
    args, model_dir, data = model_and_data(__doc__.split("\n\n")[0], "also full fine-tuning with the copy reference", argv)
    cases = {"LoRA r=8": ['--model.init_args.lora={"r": 8, "alpha": 16}']}
    if args.full:
        cases["full fine-tuning"] = []
    rows = []
    for name, extra in cases.items():
        stored, kept = run(model_dir, data, extra, True), run(model_dir, data, extra, False)
        rows.append({"case": name, "stored_mib": stored["measured_peak_mib"], "kept_mib": kept["measured_peak_mib"],
                     "planned_mib": stored["planned_peak_mib"]})
        print(json.dumps(rows[-1]))
    print("\n| case | peak MiB, frozen in bf16 / in float32 | ratio | plan MiB (bf16) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['stored_mib']:.1f} / {r['kept_mib']:.1f} | {r['stored_mib'] / r['kept_mib']:.2f} "
              f"| {r['planned_mib']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
