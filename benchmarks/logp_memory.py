"""Peak memory and time of the response log-probs (LM head + log-softmax + backward) with and without chunks.

    python benchmarks/logp_memory.py                                  # 32k vocabulary (LLaVA-Med's Mistral), 4096 tokens
    python benchmarks/logp_memory.py --vocab 152064 --tokens 2048     # Qwen2's vocabulary (HuatuoGPT-Vision)

Runs `policy.chunked_token_logps` forward and backward on `--tokens` response positions of a `--hidden` x `--vocab`
LM head (float32, CPU), each setting in a fresh process, and prints the process's peak resident memory above what
the head, its gradient and the hidden states take (measured before the call), and the seconds per call. On a GPU
(`--device cuda`) it reports torch's max allocated memory instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from vs_trl import (
    process_peak_rss_mib,  # benchmarks/ is on the path when run as a script
)


def measure(args: argparse.Namespace, chunk: int | None) -> dict:
    import torch

    from lightning_meddpo.policy import chunked_token_logps

    torch.manual_seed(0)
    device = torch.device(args.device)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device)
    states = torch.randn(args.tokens, args.hidden, device=device, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    head.weight.grad = torch.zeros_like(head.weight)
    states.grad = torch.zeros_like(states)

    def peak() -> float:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return process_peak_rss_mib()  # VmHWM: not the peak of the forking driver

    chunked_token_logps(head, states[:8], targets[:8], chunk).sum().backward()  # warm up the allocator and kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        chunked_token_logps(head, states, targets, chunk).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"chunk": chunk, "peak_mib_above_start": round(peak() - before, 1), "seconds": round(sorted(times)[len(times) // 2], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=4096, help="response positions scored in one step (all views)")
    parser.add_argument("--chunks", default="none,4096,1024,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args, None if args.one == "none" else int(args.one))))
        return
    print(f"LM head {args.hidden} x {args.vocab}, {args.tokens} response tokens, float32, {args.device}:")
    for chunk in args.chunks.split(","):
        cmd = [sys.executable, __file__, "--one", chunk, *[f"--{k}={v}" for k, v in vars(args).items()
                                                          if k not in ("one", "chunks")]]
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        print(f"  logp_chunk={out['chunk']}: peak +{out['peak_mib_above_start']} MiB, {out['seconds']} s forward+backward")


if __name__ == "__main__":
    main()
