"""`python -m lightning_meddpo build-pairs`: preference pairs from VQA or caption files (docs/design.md §4 "targeted", §5).

Input (JSON array or JSONL), one of, per record:
  * LLaVA-Med question format: {question_id, image, text, answer | gpt4_answer, answer_type}
    ("answer" is used when present, else "gpt4_answer");
  * conversations: {id, image, conversations: [{from, value}, ...]}: the last gpt turn is the answer and
    every turn before it is the prompt;
  * captions / reports: {id | study_id (default: file stem and line), image | image_path | image_paths (a
    string or a list: the first image), caption | report}, with
    the prompt `CAPTION_PROMPT`.
Any of them may carry a lesion region, {"region": {"box": [x0, y0, x1, y1]}} (pixels) or
{"region": {"mask": "masks/x.png"}} (relative to the image root, non-zero = region), used by the
"region_noise" corruption (MMedPO); without one region_noise falls back to the centred half-size box.

Output (JSON array, or JSONL when out_path ends in .jsonl), the paper's format, one record per pair:
  text-rejected:  {"id": "<src>-text", "source_id", "image", "conversations", "rejected_conversations",
                   "pair_type": "text", "error_type": "laterality" | "anatomy" | ... | "rewriter"}
  image-rejected: {"id": "<src>-image", "source_id", "image", "rejected_image", "conversations",
                   "rejected_conversations" (== conversations), "pair_type": "image", "corruption": {...}}
`image` paths stay relative to the source image root, which is only read: corrupted images are written as
PNG under `rejected_image_root / rejected_image_dir / <corruption type>/`, where `rejected_image_root` is
the output file's folder unless given, and `rejected_image` is relative to it. Train on the output with
data.init_args.image_root (the source root) and data.init_args.rejected_image_root (printed at the end). The corruption provenance (type, full spec, seed,
resolved random draws) reproduces the image: `images.corrupt(load_image(image), c["spec"], c["seed"])`.

Text-rejected answers come from `perturb_answer` (perturb.py: whole-word, case-preserving swaps of visually
grounded attributes from the lexicon in data/lexicon.py) or from a `rewriter(question, answer)` hook (an
LLM rewriter, rewriter.py). The input records are parsed in sources.py.
Answers that cannot be perturbed are skipped and counted by reason in the `BuildSummary`.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from jsonargparse import ActionConfigFile, ArgumentParser
from PIL import Image

from lightning_meddpo.checkpoints import write_text_atomic
from lightning_meddpo.commands.perturb import lexicon_tables, perturb_answer
from lightning_meddpo.commands.sources import parse_source_record
from lightning_meddpo.data.images import corrupt, load_image, normalize_spec, seed_for
from lightning_meddpo.data.lexicon import ERROR_TYPES, LEXICON  # noqa: F401 (ERROR_TYPES re-exported)
from lightning_meddpo.data.records import (
    IMAGE_TOKEN,
    RecordError,
    load_json_records,
    relative_image_path,
    valid_rows,
)

Rewriter = Callable[[str, str], "str | tuple[str, str]"]

# ------------------------------------------------------------------------------------------ output side


@dataclass
class BuildSummary:
    """What build_pairs did: records read, pairs written by type, skips by reason (with example ids)."""

    out_path: str = ""
    image_root: str = ""
    rejected_image_root: str = ""
    read: int = 0
    written: Counter = field(default_factory=Counter)  # pair_type -> n
    error_types: Counter = field(default_factory=Counter)  # error_type -> n (text pairs)
    skipped: Counter = field(default_factory=Counter)  # reason -> n
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few record ids
    placeholder_inserted: int = 0

    @property
    def total_written(self) -> int:
        return sum(self.written.values())

    def skip(self, reason: str, record_id: str) -> None:
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(record_id)

    def summary(self) -> str:
        lines = [f"{self.read} source records read; {self.total_written} pairs written to {self.out_path}"]
        for kind, n in sorted(self.written.items()):
            lines.append(f"  {kind}-rejected pairs: {n}")
        for et, n in sorted(self.error_types.items()):
            lines.append(f"    error_type {et}: {n}")
        if self.placeholder_inserted:
            lines.append(f"  {self.placeholder_inserted} prompts had no {IMAGE_TOKEN} placeholder (inserted)")
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {n}: {reason} (e.g. {', '.join(self.examples.get(reason, []))})")
        if self.total_written:
            lines.append(f"  train on it with --data.init_args.train_file={self.out_path} "
                         f"--data.init_args.image_root={self.image_root}"
                         + (f" --data.init_args.rejected_image_root={self.rejected_image_root}" if self.written.get("image") else ""))
        return "\n".join(lines)


def _safe_stem(record_id: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", record_id).strip("._")[:80] or "record"
    return f"{stem}_{seed_for(record_id, 0, 0) % 16**8:08x}"  # the hash keeps sanitised ids distinct


def _conversation(prompt: list[dict[str, str]], answer: str) -> list[dict[str, str]]:
    return [dict(t) for t in prompt] + [{"from": "gpt", "value": answer}]


def _write_records(records: list[dict[str, Any]], out_path: Path) -> None:
    if out_path.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    write_text_atomic(out_path, text, "the pairs")


def build_pairs(
    input_path: str | Path,
    image_root: str | Path,
    out_path: str | Path,
    *,
    mode: Literal["text", "image", "both"] = "both",
    corruption: str | dict[str, Any] = "crop",
    error_types: Iterable[str] | None = None,
    seed: int = 0,
    rewriter: Rewriter | None = None,
    progress: bool = True,
    rejected_image_dir: str = "rejected_images",
    skip_invalid: bool = False,
    lexicon: dict[str, Any] | None = None,
    rejected_image_root: str | Path | None = None,
) -> BuildSummary:
    """Build text- and/or image-rejected preference pairs from a VQA/caption file (see the module docstring).

    mode: "text" (lexicon or `rewriter` perturbation of the answer), "image" (`corruption` of the image,
    written as PNG under rejected_image_root/rejected_image_dir/<type>/; rejected_image_root defaults to the
    output's folder, never the source image root), or "both" (one of each per source record).
    error_types: subset of lexicon.ERROR_TYPES (None: all). rewriter(question, answer) -> rejected answer
    (or (rejected, error_type)) replaces the lexicon builder when given. Seeds are per record:
    seed_for(f"text:{id}" or id, 0, seed), so a record's pair does not depend on its position in the file.
    Malformed records and paths escaping the image root raise RecordError unless skip_invalid (then they
    are counted). Missing images and unperturbable answers are skipped and counted by reason.
    """
    from tqdm.auto import tqdm

    if mode not in ("text", "image", "both"):
        raise ValueError(f"mode must be 'text', 'image' or 'both', got {mode!r}")
    image_root, out_path = Path(image_root), Path(out_path)
    rejected_root = Path(rejected_image_root) if rejected_image_root is not None else out_path.parent
    if out_path.resolve() == Path(input_path).resolve():
        raise ValueError(f"out_path {out_path} is the input file; write the pairs to another file")
    spec = normalize_spec(corruption) if mode in ("image", "both") else None
    rel_dir = relative_image_path(rejected_image_dir, "build_pairs", None, "rejected_image_dir")
    error_types = list(error_types) if error_types is not None else None
    lexicon_tables(lexicon, error_types)  # validate the names up front
    summary = BuildSummary(out_path=str(out_path), image_root=str(image_root), rejected_image_root=str(rejected_root))
    out: list[dict[str, Any]] = []
    raws = load_json_records(Path(input_path))

    def skip(e: RecordError) -> None:
        summary.skip(f"invalid record: field {e.field_name}", e.record_id or e.source)

    items = valid_rows(raws, lambda raw, source, i: parse_source_record(raw, source), skip, skip_invalid)
    for item in tqdm(items, total=len(raws), desc="build pairs", unit="record", disable=not progress):
        summary.read += 1
        summary.placeholder_inserted += item.placeholder_inserted
        if not item.answer.strip():
            summary.skip("empty answer", item.id)
            continue
        image_path = image_root / item.image
        if not image_path.is_file():
            summary.skip("image file not found", item.id)
            continue
        img = None
        if mode in ("image", "both"):  # decode first: an undecodable image gives no pair of either kind
            try:
                img = load_image(image_path, record_id=item.id)
            except ValueError:
                summary.skip("image file cannot be decoded", item.id)
                continue
        chosen = _conversation(item.prompt, item.answer)
        base = {"source_id": item.id, "image": item.image, **item.extra}
        if mode in ("text", "both"):
            rec = _text_pair(item, chosen, base, error_types, seed, rewriter, lexicon, summary)
            if rec is not None:
                out.append(rec)
        if mode in ("image", "both"):
            rec = _image_pair(item, chosen, base, img, image_root, rejected_root, rel_dir, spec, seed, summary)
            if rec is not None:
                out.append(rec)
    _write_records(out, out_path)
    return summary


def _text_pair(item, chosen, base, error_types, seed, rewriter, lexicon, summary) -> dict[str, Any] | None:
    if rewriter is not None:
        try:
            result = rewriter(item.question, item.answer)
        except Exception as e:
            rw = sys.modules.get("lightning_meddpo.commands.rewriter")  # not imported: cannot be its RewriteError
            if rw is not None and isinstance(e, rw.RewriteError):  # the LLM answered, never usably: skip this one
                summary.skip("text: rewriter gave no rewrite that differs from the answer", item.id)
                return None
            raise RuntimeError(f"{item.source} id={item.id!r}: the rewriter failed: {e}") from e
        rejected, error_type = result if isinstance(result, tuple) else (result, "rewriter")
        if not isinstance(rejected, str) or not rejected.strip():
            summary.skip("text: rewriter returned an empty answer", item.id)
            return None
        if rejected.strip() == item.answer.strip():
            summary.skip("text: rewriter returned the answer unchanged", item.id)
            return None
    else:
        rng = np.random.default_rng(seed_for(f"text:{item.id}", 0, seed))
        res = perturb_answer(item.answer, rng, error_types, lexicon)
        if res is None:
            summary.skip("text: no lexicon term of the requested error types in the answer", item.id)
            return None
        rejected, error_type = res
    summary.written["text"] += 1
    summary.error_types[error_type] += 1
    return {"id": f"{item.id}-text", **base, "conversations": chosen,
            "rejected_conversations": _conversation(item.prompt, rejected),
            "pair_type": "text", "error_type": error_type}


def _image_pair(item, chosen, base, img, image_root, rejected_root, rel_dir, spec, seed, summary) -> dict[str, Any] | None:
    region = item.extra.get("region")
    mask_file = None
    if spec["type"] == "region_noise" and region is not None:
        if "box" in region:
            spec = {**spec, "box": region["box"], "mask": None}
        else:
            mask_file = region["mask"]
            try:
                with Image.open(image_root / mask_file) as mim:
                    mask = np.asarray(mim.convert("L")) > 0
            except OSError as e:
                summary.skip(f"image: cannot load the region mask ({type(e).__name__})", item.id)
                return None
            spec = {**spec, "box": None, "mask": mask}
    try:
        bad, prov = corrupt(img, spec, seed_for(item.id, 0, seed))
    except ValueError as e:  # e.g. a box outside the image, a mask of the wrong size
        raise RecordError(item.source, item.id, "region", str(e)) from e
    if mask_file is not None:
        prov["spec"]["mask"]["file"] = mask_file  # reproduce(image, prov, mask=<that file loaded, > 0>)
    rel = f"{rel_dir}/{prov['type']}/{_safe_stem(item.id)}.png"
    dest = rejected_root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    bad.save(dest, format="PNG")
    summary.written["image"] += 1
    return {"id": f"{item.id}-image", **base, "rejected_image": rel, "conversations": chosen,
            "rejected_conversations": [dict(t) for t in chosen], "pair_type": "image", "corruption": prov}


# --------------------------------------------------------------------------------------------------- CLI


def _parse_corruption(value: str) -> str | dict[str, Any]:
    """A corruption name ("crop") or a JSON spec ('{"type": "diffusion", "t": 500}'), checked now."""
    spec: str | dict[str, Any] = value
    if value.lstrip().startswith("{"):
        try:
            spec = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--corruption: not valid JSON: {e}") from e
    normalize_spec(spec)  # unknown names / parameters fail here, before any work
    return spec


def _parse_error_types(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    lexicon_tables(None, names)  # unknown names fail here
    return names


REWRITER_MODEL = "gpt-4o"


def build_parser() -> ArgumentParser:
    """jsonargparse, like every subcommand: `--config opts.yaml` reads the options from a file and
    `--print_config` writes them, so a build is reproducible from its options file."""
    p = ArgumentParser(
        prog="python -m lightning_meddpo build-pairs",
        description="Build text- and/or image-rejected preference pairs (the paper's format) from a VQA, "
                    "conversation or caption file (JSON array or JSONL).",
    )
    p.add_argument("--config", action=ActionConfigFile, help="options from a YAML file (as --print_config writes)")
    p.add_argument("--input", required=True, help="source records: LLaVA-Med questions, conversations or captions")
    p.add_argument("--image-root", default=None,
                   help="directory image paths are relative to, only read (default: the input file's directory)")
    p.add_argument("--out", required=True, help="output file (.json array, or .jsonl)")
    p.add_argument("--mode", choices=("text", "image", "both"), default="both",
                   help="text-rejected pairs, image-rejected pairs, or one of each per record (default: both)")
    p.add_argument("--corruption", default="crop",
                   help='image corruption: a name (crop, diffusion, region_noise, black, rotate) or a JSON spec, '
                        'e.g. \'{"type": "diffusion", "t": 500}\' (default: crop)')
    p.add_argument("--error-types", nargs="+", default=None, metavar="TYPE",
                   help=f"lexicon error types to inject (space or comma separated; default: all of {list(ERROR_TYPES)})")
    p.add_argument("--seed", type=int, default=0, help="base seed; each record's draws derive from it and its id")
    p.add_argument("--skip-invalid", action="store_true",
                   help="count and report malformed records instead of stopping at the first")
    p.add_argument("--rejected-image-root", default=None,
                   help="where corrupted images are written (default: the --out file's folder; never the source "
                        "image root unless you name it here)")
    p.add_argument("--rejected-image-dir", default="rejected_images",
                   help="folder under the rejected image root for corrupted images (default: rejected_images)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("LLM rewriter (text pairs from an OpenAI-compatible model instead of the lexicon)")
    g.add_argument("--rewriter-url", default=None, help="API base, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--rewriter-model", default=REWRITER_MODEL, help=f"model name (default: {REWRITER_MODEL})")
    g.add_argument("--rewriter-api-key-env", default="OPENAI_API_KEY",
                   help="NAME of the environment variable holding the API key (default: OPENAI_API_KEY; "
                        "unset is fine for local servers)")
    g.add_argument("--rewriter-cache-dir", default=None, help="reply cache: a rerun sends no request")
    g.add_argument("--rewriter-max-attempts", type=int, default=3,
                   help="requests per answer before giving up on it (default: 3)")
    return p


def run(args) -> BuildSummary:
    """`python -m lightning_meddpo build-pairs ...` (args: build_parser's namespace): prints what was written
    and skipped, and why. A wrong option raises ValueError naming it (the CLI prints it and exits 2)."""
    rewriter_flags = [f for f, default in (("rewriter_model", REWRITER_MODEL), ("rewriter_cache_dir", None))
                      if getattr(args, f) != default]
    if args.rewriter_url is None and rewriter_flags:
        raise ValueError(f"--{rewriter_flags[0].replace('_', '-')} needs --rewriter-url")
    if args.rewriter_url is not None and args.mode == "image":
        raise ValueError("--rewriter-url makes text pairs; it has no effect with --mode image")
    corruption = _parse_corruption(args.corruption)
    error_types = _parse_error_types(args.error_types)
    if args.rewriter_url is not None and error_types is not None:
        raise ValueError("--error-types selects lexicon perturbations; the LLM rewriter (--rewriter-url) replaces them")
    input_path = Path(args.input)
    if not input_path.is_file():
        raise FileNotFoundError(f"--input {input_path}: no such file")
    image_root = Path(args.image_root) if args.image_root is not None else input_path.parent
    if not image_root.is_dir():
        raise NotADirectoryError(f"--image-root {image_root}: no such directory")

    rewriter = client = None
    if args.rewriter_url is not None:
        from lightning_meddpo.commands.rewriter import LLMRewriter
        from lightning_meddpo.llm import LLMClient

        client = LLMClient(args.rewriter_url, args.rewriter_model, api_key_env=args.rewriter_api_key_env,
                           cache_dir=args.rewriter_cache_dir)
        rewriter = LLMRewriter(client, max_attempts=args.rewriter_max_attempts)
    try:
        summary = build_pairs(
            input_path, image_root, args.out, mode=args.mode, corruption=corruption, error_types=error_types,
            seed=args.seed, rewriter=rewriter, progress=not args.no_progress,
            rejected_image_dir=args.rejected_image_dir, skip_invalid=args.skip_invalid,
            rejected_image_root=args.rejected_image_root,
        )
    except (RecordError, ValueError, RuntimeError, OSError) as e:
        hint = "" if args.skip_invalid or not isinstance(e, RecordError) else " (--skip-invalid counts such records and goes on)"
        print(f"build-pairs: error: {e}{hint}", file=sys.stderr)
        raise SystemExit(1) from None
    print(summary.summary())
    if client is not None:
        st = client.stats
        print(f"  rewriter {client.model} at {client.url}: {st['requests']} requests, {st['cache_hits']} cache hits")
    return summary
