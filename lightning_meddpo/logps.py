"""Log-probs of target tokens without keeping a full-vocabulary log-softmax: what every scoring path ends in."""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import Tensor, nn


def token_logps(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Summed log-probs of `targets` under `logits` ([N, T, V] -> [N]), masked positions excluded.

    gather - logsumexp in float32: no full-vocabulary log-softmax tensor is kept."""
    logits = logits.float()
    safe = targets.masked_fill(~mask, 0)
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    return (picked * mask).sum(-1)


def _token_logps_chunk(head: nn.Module, states: Tensor, targets: Tensor) -> Tensor:
    logits = head(states).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)


def chunked_token_logps(head: nn.Module, states: Tensor, targets: Tensor, chunk: int | None = 1024) -> Tensor:
    """log p(target) of each token ([M, H] hidden states -> [M]), `chunk` tokens at a time.

    Each chunk's logits ([chunk, vocab], float32) live only inside it: with grad, the chunk is checkpointed, so its
    logits are recomputed in the backward instead of kept, and peak memory does not grow with response tokens x
    vocabulary (LLaVA-Med's Mistral: 32k; Qwen2: 152k entries per token). `chunk=None`: one call (the same values)."""
    if chunk is None or states.shape[0] <= chunk:
        return _token_logps_chunk(head, states, targets)
    grad = torch.is_grad_enabled() and (states.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    for start in range(0, states.shape[0], chunk):
        s, t = states[start : start + chunk], targets[start : start + chunk]
        if grad:
            parts.append(torch.utils.checkpoint.checkpoint(_token_logps_chunk, head, s, t, use_reentrant=False))
        else:
            parts.append(_token_logps_chunk(head, s, t))
    return torch.cat(parts)
