"""`python -m lightning_meddpo plan`: the GPU memory a fit config needs per device, before launching it.

    python -m lightning_meddpo plan --config configs/formulations/dpo.yaml --config configs/backbones/llava_med.yaml \\
        --shape llava_med_7b --strategy fsdp --devices 8 --gpu_gib 80

Reads the same config files as `fit` (later files override earlier ones, key by key) for the module (its
formulation decides the views scored, and so the rows), `backbone`, `reference`, `lora`, `freeze`,
`gradient_checkpointing`, `scoring`, `logp_chunk`, the data's `batch_size` and `max_length`, and the trainer's
`precision`, `strategy`, `devices` and `num_nodes`; options given here override them. The model is built on the
meta device from the backbone's config.json alone (or `--shape`: a published 7B backbone's dimensions, for
planning before downloading it). How each part is worked out: lightning_meddpo/plan.py.

Prints the parts for the configured batch with and without activation checkpointing, whether the peak fits
`--gpu_gib` (leaving 10% for the CUDA context and fragmentation), and the largest batch that does.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser

DEFAULT_PROMPT_TEXT = 64  # prompt text tokens besides the image's, when no data is read
DEFAULT_RESPONSE = 128
LARGEST = 4096  # the batch search stops here


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m lightning_meddpo plan",
                       description="The GPU memory a fit config needs per device (built on the meta device: no "
                                   "weights, no GPU), and the largest batch that fits.")
    p.add_argument("--config", action="append", default=[], help="a fit config file; repeat it in the order fit "
                   "takes them (--config configs/formulations/dpo.yaml --config configs/backbones/llava_med.yaml)")
    p.add_argument("--shape", type=str | None, default=None, help="plan a published backbone by its dimensions: "
                   "llava_med_7b or huatuo_7b (instead of the config's backbone directory)")
    p.add_argument("--backbone", type=str | None, default=None, help="a model directory (config.json is enough)")
    p.add_argument("--strategy", type=str | None, default=None, help="single, ddp, fsdp or fsdp2 (default: the config's)")
    p.add_argument("--devices", type=int | None, default=None, help="data-parallel devices in all (default: the config's)")
    p.add_argument("--precision", type=str | None, default=None, help="32-true, bf16-mixed or bf16-true")
    p.add_argument("--batch_size", type=int | None, default=None, help="pairs per device and step")
    p.add_argument("--lora", type=bool | None, default=None, help="plan with the config's LoRA (true) or without (false)")
    p.add_argument("--prompt_tokens", type=int | None, default=None,
                   help=f"prompt tokens per pair, image included (default: the image's + {DEFAULT_PROMPT_TEXT})")
    p.add_argument("--response_tokens", type=int, default=DEFAULT_RESPONSE, help="tokens per response")
    p.add_argument("--image_tokens", type=int | None, default=None, help="tokens per image (default: the config's)")
    p.add_argument("--saved_dtype", type=str | None, default=None, help="the dtype the backbone's weights are saved in "
                   "(default: its config.json's; unknown for --shape): under bf16-mixed, frozen weights saved in "
                   "bfloat16 are kept in it")
    p.add_argument("--gpu_gib", type=float, default=80.0, help="memory of one device, GiB")
    p.add_argument("--json", type=bool, default=False, help="print the plan as JSON")
    return p


def merged_config(files: list[str]) -> dict[str, Any]:
    """The config files merged as `fit` stacks them: mappings key by key, anything else replaced."""
    def merge(a: Any, b: Any) -> Any:
        if isinstance(a, dict) and isinstance(b, dict):
            if "class_path" in b and a.get("class_path") not in (None, b["class_path"]):
                return b  # another class: its own arguments only
            return {**a, **{k: merge(a.get(k), v) for k, v in b.items()}}
        return b

    config: dict[str, Any] = {}
    for f in files:
        config = merge(config, yaml.safe_load(Path(f).read_text(encoding="utf-8")) or {})
    return config


def module_class(class_path: str | None):
    from lightning_meddpo.modules.base import PreferenceModule

    if not class_path:
        return PreferenceModule
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def planned_views(cls, init_args: dict) -> tuple[str, ...]:
    """The views a step scores: the family's, or for Multimodal those of its formulation on a batch with m'."""
    loss = init_args.get("loss_type") or init_args.get("loss")
    if cls.__name__ == "Multimodal":
        return ("chosen", "chosen_mprime") if loss == "copo" else ("chosen", "rejected", "chosen_mprime")
    return tuple(cls.views)


def default_of(cls, name: str, fallback: Any) -> Any:
    for klass in cls.__mro__:
        parameter = inspect.signature(klass.__init__).parameters.get(name) if "__init__" in vars(klass) else None
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return parameter.default
    return fallback


def strategy_name(strategy: Any) -> str:
    path = strategy.get("class_path", "") if isinstance(strategy, dict) else str(strategy or "")
    if "FSDP2" in path or "ModelParallel" in path or path == "fsdp2":
        return "fsdp2"
    if "FSDP" in path or path.startswith("fsdp"):
        return "fsdp"
    if "DDP" in path or path.startswith("ddp"):
        return "ddp"
    return "single"


def image_tokens(config) -> int | None:
    if getattr(config, "image_seq_length", None):
        return int(config.image_seq_length)
    vision = getattr(config, "vision_config", None)
    if vision is not None and hasattr(vision, "image_size") and hasattr(vision, "patch_size"):
        return (vision.image_size // vision.patch_size) ** 2
    return None


def workload_for(views: tuple[str, ...], packed: bool, prompt: int, response: int):
    """Workload(batch) for pairs of `prompt` tokens and responses of `response` tokens (plan.Workload)."""
    from lightning_meddpo.data.rows import VIEWS
    from lightning_meddpo.plan import Workload

    sides: dict[str, int] = {}
    for v in views:
        sides[VIEWS[v][1]] = sides.get(VIEWS[v][1], 0) + 1
    per_row = max(sides.values()) if packed else 1

    def of(batch: int) -> Workload:
        rows = batch * (len(sides) if packed else len(views))
        return Workload(rows=rows, row_tokens=prompt + per_row * response, images=batch * len(sides),
                        response_tokens=batch * len(views) * response)

    return of


def run(args) -> dict:
    from lightning_meddpo.backbones.build import LoraSettings
    from lightning_meddpo.plan import GIB, HEADROOM, Planner, Settings, published_config

    config = merged_config(args.config)
    model_cfg = config.get("model") or {}
    init = dict(model_cfg.get("init_args") or {})
    data = (config.get("data") or {}).get("init_args") or {}
    trainer = config.get("trainer") or {}
    cls = module_class(model_cfg.get("class_path"))
    if args.shape:
        hf_config = published_config(args.shape)
        source = f"--shape {args.shape}"
    else:
        from transformers import AutoConfig

        from lightning_meddpo.backbones.loader import resolve_backbone

        source = args.backbone or init.get("backbone") or default_of(cls, "backbone", "tiny://llama")
        hf_config = AutoConfig.from_pretrained(resolve_backbone(source), trust_remote_code=bool(init.get("trust_remote_code")))
    lora = init.get("lora") if args.lora is not False else None
    if args.lora and lora is None:
        lora = {}
    devices = args.devices or (_count(trainer.get("devices")) * _count(trainer.get("num_nodes")))
    settings = Settings(
        precision=str(args.precision or trainer.get("precision") or "32-true"),
        strategy=args.strategy or strategy_name(trainer.get("strategy")),
        devices=devices,
        reference=init.get("reference") or default_of(cls, "reference", "copy"),
        lora=LoraSettings(**lora) if isinstance(lora, dict) else None,
        freeze=list(init.get("freeze") or []) + [p for p, k in (("vision_tower", "freeze_vision_tower"),
                                                                  ("projector", "freeze_projector")) if init.get(k)],
        gradient_checkpointing=False,
        logp_chunk=init.get("logp_chunk", 1024),
        saved_dtype=args.saved_dtype,
    )
    views = planned_views(cls, init)
    packed = (init.get("scoring") or "packed") == "packed"
    image = args.image_tokens or image_tokens(hf_config)
    if image is None:
        raise ValueError(f"plan: cannot tell how many tokens an image of {source} takes; give --image_tokens")
    max_length = int(data.get("max_length") or 2048)
    prompt = args.prompt_tokens or image + DEFAULT_PROMPT_TEXT
    response = min(args.response_tokens, max_length - prompt)
    if prompt < image or response < 1:
        raise ValueError(f"plan: a prompt of {prompt} tokens (the image takes {image}) leaves {max(0, response)} of "
                         f"max_length {max_length} for a response: raise max_length or set --prompt_tokens")
    batch = args.batch_size or int(data.get("batch_size") or 1)
    of = workload_for(views, packed, prompt, response)
    result = {"source": source, "module": cls.__name__, "views": list(views), "settings": _plain(vars(settings)),
              "gpu_gib": args.gpu_gib, "batch_size": batch, "workload": vars(of(batch)),
              "prompt_tokens": prompt, "response_tokens": response}
    planner = Planner(hf_config, settings)
    for checkpointing in (False, True):
        planner.settings.gradient_checkpointing = checkpointing
        plan = planner.plan(of(batch))
        result["checkpointing" if checkpointing else "plain"] = {
            **{k: v for k, v in plan.as_dict().items() if k != "notes"},
            "fits": plan.fits(args.gpu_gib), "largest_batch": planner.largest_batch(of, args.gpu_gib, LARGEST)}
        result["notes"] = plan.notes
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(render(result, GIB, HEADROOM))
    return result


def _count(value: Any) -> int:
    return int(value) if isinstance(value, int) or (isinstance(value, str) and value.isdigit()) else 1


def _plain(settings: dict) -> dict:
    return {k: (vars(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in settings.items()}


PARTS = (("weights", "weights"), ("reference", "reference model"), ("gradients", "gradients"),
         ("optimizer", "optimizer states"), ("activations", "activations"), ("logits", "logits (log-probs)"),
         ("optimizer_scratch", "optimizer step scratch"), ("unsharded_layers", "unsharded layers (FSDP)"))


def render(r: dict, gib: int, headroom: float) -> str:
    s, w, plain, ckpt = r["settings"], r["workload"], r["plain"], r["checkpointing"]
    unit, scale = ("GiB", gib) if plain["peak"] >= gib else ("MiB", 2**20)
    lora = f"LoRA r={s['lora']['r']}" if s["lora"] else "full fine-tuning"
    lines = [
        f"plan: {r['source']}, {r['module']} ({', '.join(r['views'])}), {lora}, reference {s['reference']}, "
        f"{s['precision']}, {s['strategy']} x {s['devices']}",
        f"  {plain['parameters'] / 1e6:,.1f} M parameters, {plain['trainable_parameters'] / 1e6:,.1f} M trainable",
        f"  per device and step: {r['batch_size']} pairs -> {w['rows']} rows x {w['row_tokens']} tokens "
        f"(prompt {r['prompt_tokens']} incl. the image, responses {r['response_tokens']}), {w['images']} images",
        f"  {unit:26}{'plain':>10}{'checkpointed':>15}",
    ]
    for key, name in (*PARTS, ("peak", "peak")):
        lines.append(f"  {name:26}{plain[key] / scale:>10.2f}{ckpt[key] / scale:>15.2f}")
    label = f"fits {r['gpu_gib']:g} GiB (at {headroom:.0%})"
    lines.append(f"  {label:26}{'yes' if plain['fits'] else 'no':>10}{'yes' if ckpt['fits'] else 'no':>15}")
    largest = [f"{n}" if n < LARGEST else f">={n}" for n in (plain["largest_batch"], ckpt["largest_batch"])]
    lines.append(f"  {'largest batch (pairs)':26}{largest[0]:>10}{largest[1]:>15}")
    lines += [f"  note: {n}" for n in r["notes"]]
    return "\n".join(lines)
