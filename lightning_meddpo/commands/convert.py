"""`python -m lightning_meddpo convert`: an original-LLaVA-layout checkpoint (LLaVA-Med v1.5, HuatuoGPT-Vision) into a
transformers LLaVA directory. The conversion is the LLaVA family's (backbones/llava_convert.py); this is its
program: options, the report printed as JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_meddpo.backbones.llava_convert import (  # noqa: F401  (the conversion's API, as before)
    ConversionError,
    ConversionReport,
    convert_llava_checkpoint,
    expand_to_square,
)

DESCRIPTION = "Convert an original-LLaVA-layout checkpoint into a transformers `LlavaForConditionalGeneration` directory."


# ---------------------------------------------------------------------------------------------- command line


def build_parser() -> ArgumentParser:
    """Arguments of `python -m lightning_meddpo convert` (jsonargparse, like every subcommand: `--config`
    reads them from a file, `--print_config` writes them)."""
    parser = ArgumentParser(prog="python -m lightning_meddpo convert", description=DESCRIPTION)
    parser.add_argument("--config", action=ActionConfigFile, help="options from a YAML file (as --print_config writes)")
    parser.add_argument("--src", required=True, help="original-LLaVA-layout checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory (LlavaForConditionalGeneration)")
    parser.add_argument("--vision-tower-dir", default=None,
                        help="local CLIP directory (default: mm_vision_tower if it is a local directory)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="cast weights (default: the source config's torch_dtype)")
    parser.add_argument("--chat-template", default=None,
                        help="template name from lightning_meddpo.backbones.templates, or 'none'")
    parser.add_argument("--pad-vocab-to-multiple-of", type=int, default=None)
    parser.add_argument("--vision-source", choices=["auto", "checkpoint", "clip"], default="auto",
                        help="vision tower weights: auto follows the original loader (LLaVA-Med: the CLIP directory; "
                             "HuatuoGPT-Vision: the checkpoint's copy), or force one")
    return parser


def run(args) -> ConversionReport:
    """Convert, then print the report (a ConversionError names every key that does not fit)."""
    logging.basicConfig(level=logging.INFO)
    report = convert_llava_checkpoint(
        args.src, args.out, vision_tower_dir=args.vision_tower_dir, dtype=args.dtype,
        chat_template=args.chat_template, pad_vocab_to_multiple_of=args.pad_vocab_to_multiple_of,
        vision_source=args.vision_source,
    )
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in report.__dict__.items()}, indent=2))
    return report
