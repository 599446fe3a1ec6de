"""Packed rows' attention on the CPU: SDPA under the full [L, L] block mask (what eager/sdpa need without
attention.py) against `attention.prefix_sdpa` (a causal pass plus the later response's correction), forward and
forward+backward, per layer call, at LLaVA-Med's row shape by default: 4 rows of [590-token prompt | 15 | 15],
4 query heads of 16 over 2 key/value heads, as in vs_trl.py's llava_med model.

    python benchmarks/packed_attention.py
    python benchmarks/packed_attention.py --prompt 1200 --response 40 --repeats 20

Prints the largest difference of the two outputs (they are the same attention) and median milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_meddpo.attention import prefix_layout, prefix_sdpa  # noqa: E402


def segments(rows: int, prompt: int, response: int) -> torch.Tensor:
    """[R, L] segment ids of rows [prompt | chosen | rejected] (0 prompt, 1 and 2 the responses)."""
    row = [0] * prompt + [1] * response + [2] * response
    return torch.tensor([row] * rows)


def block_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[R, 1, L, L] bool: token i sees j iff j <= i and j is on the prompt or in i's own response."""
    length = segment_ids.shape[1]
    keys, queries = segment_ids[:, None, :], segment_ids[:, :, None]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return (((keys == 0) | (keys == queries)) & causal)[:, None]


def median_ms(fn, repeats: int, backward: bool, make) -> float:
    times = []
    for _ in range(repeats + 2):  # the first two warm up
        q, k, v = make()
        start = time.perf_counter()
        if backward:
            fn(q, k, v).sum().backward()
        else:
            with torch.no_grad():
                fn(q, k, v)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--prompt", type=int, default=590)
    p.add_argument("--response", type=int, default=15)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    seg = segments(a.rows, a.prompt, a.response)
    layout, mask = prefix_layout(seg), block_mask(seg)
    length, groups = seg.shape[1], a.heads // a.kv_heads
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=groups, training=False)
    scaling = a.head_dim**-0.5

    def make():
        shape = lambda h: (a.rows, h, length, a.head_dim)  # noqa: E731
        return [torch.randn(shape(h), requires_grad=True) for h in (a.heads, a.kv_heads, a.kv_heads)]

    def full(q, k, v):
        return prefix_sdpa(module, q, k, v, mask, scaling=scaling)[0]  # no layout: transformers' sdpa

    def prefix(q, k, v):
        return prefix_sdpa(module, q, k, v, layout.mask, prefix_layout=layout, scaling=scaling)[0]

    q, k, v = make()
    with torch.no_grad():
        diff = (full(q, k, v) - prefix(q, k, v)).abs().max().item()
    print(f"{a.rows} rows x {length} tokens, {a.heads} heads ({a.kv_heads} kv) of {a.head_dim}, "
          f"{torch.get_num_threads()} threads; max |full - prefix| = {diff:.2e}")
    for name, fn in (("full block mask", full), ("prefix_sdpa", prefix)):
        fwd = median_ms(fn, a.repeats, False, make)
        both = median_ms(fn, a.repeats, True, make)
        print(f"{name:16s} forward {fwd:6.2f} ms   forward+backward {both:6.2f} ms")


if __name__ == "__main__":
    main()
