"""`python -m lightning_meddpo export`: a Lightning checkpoint -> a Hugging Face model directory.

    python -m lightning_meddpo export --ckpt_path runs/demo/version_0/checkpoints/last.ckpt --out hf/
    python -m lightning_meddpo export --ckpt_path last.ckpt --config runs/.../config.yaml --out hf/ --no-merge

The checkpoint is a single `.ckpt` file (single device, DDP, FSDP full) or a sharded directory
(FSDP2 via ModelParallelStrategy / FSDPStrategy with sharded state: torch.distributed.checkpoint),
which is gathered into one full state dict on CPU. The module class and its arguments come from
`--config` (the config.yaml LightningCLI writes into the log directory) or, without it, from the
checkpoint itself (the class recorded by PreferenceModule.on_save_checkpoint and Lightning's
hyper_parameters). The policy model is rebuilt, its weights loaded, LoRA adapters merged (unless
`--no-merge`: then the directory holds the peft adapter, loadable with peft's
`AutoPeftModelForImageTextToText` / `PeftModel.from_pretrained` on the base), and saved with
`save_pretrained` next to the processor. The export reloads with `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from jsonargparse import ArgumentParser

from lightning_meddpo.checkpoints import atomic_write, remove_partial, restore_left_out

if TYPE_CHECKING:  # torch is imported where it is used: --help starts without it (entry.py)
    import torch

log = logging.getLogger(__name__)
POLICY_PREFIX = "policy.model."


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as a dict with a full `state_dict` on CPU (sharded directories gathered)."""
    import torch

    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise ValueError(f"{path}: a directory, but not a torch.distributed.checkpoint (no .metadata)")
        checkpoint = read_sharded_checkpoint(path)
    elif path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"--ckpt_path {path}: no such file or directory")
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a Lightning checkpoint (no state_dict)")
    state = checkpoint["state_dict"]
    checkpoint["state_dict"] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state.items()}
    return checkpoint


def read_sharded_checkpoint(path: Path) -> dict[str, Any]:
    """A torch.distributed.checkpoint directory (FSDP / FSDP2 `state_dict_type: sharded`) as one dict, through
    torch's public `dcp_to_torch_save` (Lightning's own reader is private). It goes through a temporary file
    in the system's temp directory, never the checkpoint's folder: a copy of the weights on disk for a moment.
    Lightning keeps the non-tensor state (epoch, hyper-parameters, loops) beside the shards in meta.pt."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="lightning_meddpo-export-") as tmp:
        gathered = Path(tmp) / "checkpoint.pt"
        dcp_to_torch_save(path, gathered)
        checkpoint = torch.load(gathered, map_location="cpu", weights_only=True)
    meta = path / "meta.pt"
    if meta.is_file():
        checkpoint.update(torch.load(meta, map_location="cpu", weights_only=True))
    return checkpoint


def module_spec(checkpoint: dict[str, Any], config: str | None) -> tuple[str, dict[str, Any]]:
    """(class path, init args) of the LightningModule that wrote the checkpoint."""
    if config is not None:
        cfg = yaml.safe_load(Path(config).read_text())
        model = cfg.get("model") or cfg.get("fit", {}).get("model")
        if not model or "class_path" not in model:
            raise ValueError(f"{config}: no model.class_path (pass the config.yaml of the run)")
        return model["class_path"], dict(model.get("init_args") or {})
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    class_path = (checkpoint.get("meddpo") or {}).get("module_class") or hparams.get("_class_path")
    if class_path is None:
        raise ValueError("the checkpoint does not name its module class; pass --config with the run's config.yaml")
    if not class_path.startswith("lightning_meddpo.modules."):
        raise ValueError(f"the checkpoint names the module class {class_path!r}, not one of lightning_meddpo.modules: "
                         "it is not imported from a checkpoint; pass --config with the run's config.yaml")
    from lightning_meddpo.modules.settings import upgraded

    args = upgraded({k: v for k, v in hparams.items() if not k.startswith("_")})
    args["trust_remote_code"] = False  # never switched on by a file: only by --trust-remote-code
    return class_path, args


def build_module(class_path: str, init_args: dict[str, Any], complete: bool = True):
    """The module with its policy model built (no reference: only the policy is exported). `complete`: the
    checkpoint holds every policy weight, so a .ckpt start point (init_from) need not be read."""
    module_name, _, cls_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    args = dict(init_args)
    args["reference"] = "none"
    if complete and args.get("init_from") and not Path(args["init_from"]).is_dir():
        args["init_from"] = None  # a .ckpt start point: its weights are overwritten by this checkpoint anyway
    module = cls(**args)
    module.configure_model()
    return module


def policy_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights = {k[len(POLICY_PREFIX) :]: v for k, v in state.items() if k.startswith(POLICY_PREFIX)}
    if not weights:
        raise ValueError(f"no '{POLICY_PREFIX}*' weights in the checkpoint")
    return weights


@contextlib.contextmanager
def safetensors_io_as_oserror() -> Iterator[None]:
    """safetensors reports a failed write (a full disk) as a SafetensorError "... (os error 28)": raise it as the
    OSError it is, so it is reported like every other failed write."""
    try:
        yield
    except Exception as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None or isinstance(e, OSError):
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from e


def check_output(out: Path, ckpt_path: str | Path, overwrite: bool) -> None:
    """`out` may be new or an empty folder; a folder with files only with `overwrite` (a user's model is never
    replaced unasked), never the folder holding the checkpoint itself; an existing file never."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: an existing file; export writes a folder: choose a new path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if Path(ckpt_path).resolve().is_relative_to(out.resolve()):
        raise FileExistsError(f"--out {out}: holds the checkpoint being exported ({ckpt_path}); choose another folder")
    if not overwrite:
        held = sorted(p.name for p in out.iterdir())
        raise FileExistsError(f"--out {out}: the folder is not empty (it holds {', '.join(held[:4])}"
                              f"{', ...' if len(held) > 4 else ''}); choose a new folder, or pass --overwrite to replace it")


def export(ckpt_path: str, out: str, *, config: str | None = None, merge: bool = True, dtype: str | None = None,
           trust_remote_code: bool = False, overwrite: bool = False) -> Path:
    """Write the policy of a Lightning checkpoint as a Hugging Face directory; returns `out`. The backbone's
    own code (trust_remote_code) runs only when the caller asks here or in their --config, never because a
    checkpoint's saved hyper-parameters say so. A non-empty `out` is refused unless `overwrite` (see
    check_output); the model is written beside `out` and swapped in, so a failure (a full disk) leaves what was
    there and no partial folder."""
    import torch

    from lightning_meddpo.backbones.adapter import adapter_for, base_model

    out_dir = Path(out)
    check_output(out_dir, ckpt_path, overwrite)
    checkpoint = read_checkpoint(ckpt_path)
    class_path, init_args = module_spec(checkpoint, config)
    if trust_remote_code:
        init_args["trust_remote_code"] = True
    left_out = (checkpoint.get("meddpo") or {}).get("left_out")
    module = build_module(class_path, init_args, complete=not left_out)
    restore_left_out(checkpoint, module, str(ckpt_path))  # frozen weights it left out: the backbone's, checked
    model = module.policy.model
    missing, unexpected = model.load_state_dict(policy_state_dict(checkpoint["state_dict"]), strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt_path}: does not match {class_path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    is_peft = hasattr(model, "merge_and_unload")
    if is_peft and merge:
        model = model.merge_and_unload()
    base = base_model(model)
    if getattr(base, "is_activation_checkpointing", False):
        base.gradient_checkpointing_disable()
    base.config.use_cache = True
    model.eval()
    if dtype is not None:
        model = model.to(getattr(torch, dtype))

    def write(tmp: Path) -> None:
        remove_partial(tmp)  # a partial export of a killed earlier run
        with safetensors_io_as_oserror():
            model.save_pretrained(tmp)
        adapter_for(base).save_processor(module.processor, tmp)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir, write, "the exported model")  # written beside, then swapped in: never half a model
    log.info("exported %s (%s%s) to %s", ckpt_path, class_path, ", LoRA merged" if is_peft and merge else "", out_dir)
    return out_dir


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m lightning_meddpo export",
                            description="Export a checkpoint's policy as a Hugging Face model directory (LoRA merged "
                                        "unless --no-merge).")
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file or a sharded checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory (Hugging Face format)")
    parser.add_argument("--config", help="the run's config.yaml (default: read the module from the checkpoint)")
    parser.add_argument("--no-merge", dest="merge", action="store_false", help="save LoRA adapters unmerged")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights (default: as trained)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out folder (written beside it, then swapped in)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the backbone run its own code (never taken from the checkpoint)")
    return parser


def run(args) -> Path:
    logging.basicConfig(level=logging.INFO)
    out = export(args.ckpt_path, args.out, config=args.config, merge=args.merge, dtype=args.dtype,
                 trust_remote_code=args.trust_remote_code, overwrite=args.overwrite)
    print(out)
    return out
