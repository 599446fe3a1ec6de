"""What leaving the frozen weights out of checkpoints saves (PreferenceModule.left_out_weights), measured.

    python benchmarks/checkpoint_size.py                       # LoRA, a ~110M LLaVA saved in bfloat16
    python benchmarks/checkpoint_size.py --hidden 512 --layers 4 --full   # also full fine-tuning

Builds a LLaVA-shaped model (CLIP + Mistral, saved in bfloat16 as published backbones are: benchmarks/
frozen_storage.py), trains DPO one step under bf16-mixed and saves its checkpoint twice: as by default (the
policy's frozen weights left out, their digests kept) and with `save_frozen_weights: true`. Prints per case the
file size, the seconds to save and the seconds to load it (the fastest of 3, the cases alternating) (`load_from_checkpoint`, which builds the model from the
backbone either way and, for the default, checks the digests). That a resume from either is the same run is
tested (tests/test_left_out_weights.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from frozen_storage import model_and_data  # noqa: E402


def measure(model_dir: Path, data: Path, root: Path, lora: dict | None, repeats: int = 3) -> dict:
    import lightning as L

    from lightning_meddpo.data.datamodule import PreferenceDataModule
    from lightning_meddpo.modules import DPO

    module = DPO(backbone=str(model_dir), lora=lora)
    datamodule = PreferenceDataModule(str(data / "train.json"), str(data / "val.json"), batch_size=2,
                                      processor=module.processor)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", precision="bf16-mixed", logger=False, limit_val_batches=0,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=str(root))
    trainer.fit(module, datamodule=datamodule)
    row: dict = {"case": "lora" if lora else "full fine-tuning",
                 "frozen_parameters": sum(p.numel() for p in module.policy.model.parameters() if not p.requires_grad)}
    times: dict[str, dict[str, list[float]]] = {"default": {"save_s": [], "load_s": []},
                                                "save_frozen_weights": {"save_s": [], "load_s": []}}
    for _ in range(repeats):  # alternating, so neither case gets the cold (first) file system and allocator alone
        for name, seconds in times.items():
            module.hparams["save_frozen_weights"] = name == "save_frozen_weights"
            path = root / f"{name}.ckpt"
            start = time.perf_counter()
            trainer.save_checkpoint(path)
            seconds["save_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            DPO.load_from_checkpoint(path, map_location="cpu")
            seconds["load_s"].append(time.perf_counter() - start)
    for name, seconds in times.items():
        row[name] = {"mib": (root / f"{name}.ckpt").stat().st_size / 2**20, **{k: min(v) for k, v in seconds.items()}}
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    a, model_dir, data = model_and_data(__doc__.split("\n\n")[0], "also full fine-tuning (only never-trained CLIP "
                                        "layers are frozen)", argv)
    cases = [{"r": 8, "alpha": 16}] + ([None] if a.full else [])
    rows = [measure(model_dir, data, model_dir.parent, lora) for lora in cases]
    print(json.dumps(rows, indent=1))
    print("| case | frozen parameters | checkpoint MiB (default / kept) | save s | load s |")
    print("|---|---|---|---|---|")
    for r in rows:
        d, k = r["default"], r["save_frozen_weights"]
        print(f"| {r['case']} | {r['frozen_parameters']:,} | {d['mib']:.1f} / {k['mib']:.1f} | {d['save_s']:.2f} / "
              f"{k['save_s']:.2f} | {d['load_s']:.2f} / {k['load_s']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
