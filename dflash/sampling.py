"""Token choice and exact speculative sampling (accept with min(1, p/q), residual on rejection).

Everything here stays on the device: the decoding loop reads back one small tensor per cycle.
"""
from __future__ import annotations

import torch


def probs_at(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


def choose(logits: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
    """Greedy argmax (temperature 0) or a sample at ``temperature``; logits [..., V] -> [...]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = probs_at(logits, temperature)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def greedy_accept(proposals: torch.Tensor, target_logits: torch.Tensor):
    """proposals [b-1], target_logits [b, V] -> (accepted count tensor, posterior [b])."""
    posterior = target_logits.argmax(dim=-1)
    matches = (proposals == posterior[:-1]).to(torch.int64)
    accepted = torch.cumprod(matches, dim=0).sum()
    return accepted, posterior


def speculative_accept(proposals: torch.Tensor, draft_probs: torch.Tensor,
                       target_probs: torch.Tensor, generator=None):
    """Standard speculative sampling over one block, exact for the target distribution.

    proposals [b-1] drawn from draft_probs [b-1, V]; target_probs [b, V] (row i is the target
    distribution for the token after block slot i). Returns (accepted count, next tokens [b])
    where next_tokens[a] is the token to emit after ``a`` accepted proposals: the residual
    sample at the first rejection, or a bonus sample from the last row when all are accepted.
    """
    n = proposals.shape[0]
    idx = torch.arange(n, device=proposals.device)
    p_x = target_probs[idx, proposals]
    q_x = draft_probs[idx, proposals]
    u = torch.rand(n, device=proposals.device, generator=generator)
    accept = (u * q_x < p_x).to(torch.int64)  # u < p/q without dividing by zero
    accepted = torch.cumprod(accept, dim=0).sum()
    residual = (target_probs[:n] - draft_probs).clamp_min(0)
    mass = residual.sum(dim=-1, keepdim=True)
    # Zero residual mass means p == q there, so acceptance was certain: any row is fine.
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), target_probs[:n])
    rows = torch.cat([residual, target_probs[n:]], dim=0)
    next_tokens = torch.multinomial(rows, 1, generator=generator).squeeze(-1)
    return accepted, next_tokens
