"""Token choice and exact speculative sampling (accept with min(1, p/q), residual on rejection).

Everything here stays on the device: the decoding loop reads back one small tensor per cycle.

Sampling filters (top-k, top-p) follow the upstream reference: logits / T; keep the ``top_k``
largest (0 = all); softmax; keep the tokens whose cumulative probability *before* them is
``< top_p`` (so the most likely token always stays); renormalise. Target and draft are
filtered alike, and speculative sampling against the filtered target emits tokens with the
filtered target's law exactly (the acceptance argument holds for any pair p, q).
Ties are broken by token id (a stable sort: the lower id counts as larger), so the filtered
distribution is a deterministic function of the logits on every device.
"""
from __future__ import annotations

import math
import numbers

import torch

from ..errors import UserError


def check_sampling(temperature, top_p=1.0, top_k=0):
    """Validate sampling settings; one-line :class:`UserError` naming the bad option.

    Returns ``(temperature, top_p, top_k)`` as ``(float, float, int)``."""
    def number(value, flag):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise UserError(f"{flag} must be a number, got {value!r}")
        return float(value)

    t = number(temperature, "--temperature")
    if not (math.isfinite(t) and t >= 0):
        raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    p = number(top_p, "--top-p")
    if not (0.0 < p <= 1.0):  # also refuses NaN
        raise UserError(f"--top-p must be in (0, 1] (1 = off), got {top_p}")
    if isinstance(top_k, bool) or not (isinstance(top_k, numbers.Integral) or (
            isinstance(top_k, numbers.Real) and math.isfinite(top_k) and float(top_k).is_integer())):
        raise UserError(f"--top-k must be an integer >= 0 (0 = off), got {top_k!r}")
    k = int(top_k)
    if k < 0:
        raise UserError(f"--top-k must be an integer >= 0 (0 = off), got {top_k}")
    return t, p, k


def filters_active(vocab: int, top_p: float = 1.0, top_k: int = 0) -> bool:
    """True when top-p / top-k change anything for a vocabulary of ``vocab`` tokens."""
    return top_p < 1.0 or 0 < top_k < vocab


def probs_at(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
             top_k: int = 0) -> torch.Tensor:
    """The (filtered) sampling distribution at ``temperature`` > 0; logits [..., V] -> [..., V].

    Without filters this is exactly ``softmax(logits / T)`` (the unfiltered path is unchanged)."""
    scaled = logits.float() / temperature
    vocab = scaled.shape[-1]
    if not filters_active(vocab, top_p, top_k):
        return torch.softmax(scaled, dim=-1)
    # One stable descending sort serves both filters (ties: lower token id first); no host sync.
    values, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    if 0 < top_k < vocab:
        values, order = values[..., :top_k], order[..., :top_k]
    kept = torch.softmax(values, dim=-1)
    if top_p < 1.0:
        before = kept.cumsum(dim=-1) - kept  # mass of the more likely tokens
        kept = kept * (before < top_p)
        kept = kept / kept.sum(dim=-1, keepdim=True)  # slot 0 always stays: sum > 0
    return torch.zeros_like(scaled).scatter_(-1, order, kept)


def choose(logits: torch.Tensor, temperature: float, generator=None, top_p: float = 1.0,
           top_k: int = 0) -> torch.Tensor:
    """Greedy argmax (temperature 0; filters ignored) or a sample from the filtered
    distribution at ``temperature``; logits [..., V] -> [...]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = probs_at(logits, temperature, top_p, top_k)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


# Above this many kept tokens, top-k's candidates come from a full sort (topk is slower there).
TOPK_CANDIDATES_MAX = 4096


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim from reductions that spread a long row over the whole GPU
    (torch.softmax gives each row one block: ~40 us for one 152k row on an H200)."""
    e = (x - x.amax(dim=-1, keepdim=True)).exp_()
    return e / e.sum(dim=-1, keepdim=True)


def _prefix_length(values: torch.Tensor, top_p: float) -> torch.Tensor:
    """How many of the sorted kept ``values`` [n, k] top-p keeps ([n, 1]); the same float ops
    as probs_at on the same values, so the same count."""
    if top_p >= 1.0:
        return torch.full_like(values[..., :1], values.shape[-1], dtype=torch.int64)
    kept = torch.softmax(values, dim=-1)
    return ((kept.cumsum(dim=-1) - kept) < top_p).sum(dim=-1, keepdim=True)


def filtered_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                   top_k: int = 0) -> torch.Tensor:
    """:func:`probs_at` without its full stable sort of the vocabulary: the same kept set,
    the same renormalised law (up to float rounding); device ops only (graph-capturable).

    Both filters keep a prefix of the stable order (value descending, then id). The prefix
    length comes from the sorted *values* alone, which ``torch.topk`` (or, for top-p without
    top-k, a values sort) gives exactly whatever its tie order; the kept set is then every
    token above the prefix's last value plus the lowest ids among the tokens equal to it."""
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    vocab = scaled.shape[-1]
    if not filters_active(vocab, top_p, top_k):
        return _softmax(scaled)
    k = top_k if 0 < top_k < vocab else vocab
    if k <= TOPK_CANDIDATES_MAX:
        values = torch.topk(scaled, k, dim=-1).values
    else:
        values = torch.sort(scaled, dim=-1, descending=True).values[..., :k]
    length = _prefix_length(values, top_p)
    edge = values.gather(-1, length - 1)  # the last kept value
    above = (values > edge).sum(dim=-1, keepdim=True)
    tied = scaled == edge
    keep = (scaled > edge) | (tied & (tied.cumsum(dim=-1) <= length - above))
    return _softmax(scaled.masked_fill(~keep, -math.inf))


def sparse_filtered(logits: torch.Tensor, temperature: float, top_p: float, top_k: int):
    """The law of :func:`probs_at` for 0 < ``top_k`` <= TOPK_CANDIDATES_MAX (and any top_p)
    on its support only: (ids [n, 2k], probs [n, 2k]), zero-probability slots' ids
    meaningless. Beyond topk, two passes over the vocabulary (the tie test at the edge and a
    topk of the tied ids), no softmax, sort or random numbers over it; graph-capturable.

    Kept: the candidates above the prefix's last value (all of them are among topk's, whose
    ids for the tokens tied with its k-th value may be any of them) and the
    lowest ids tied with it (topk of ``-id`` over the tied tokens), as in
    :func:`filtered_probs`. 16-bit logits are compared as they are (dividing them by T in
    float32 merges no two values), others after the division, as probs_at does."""
    vocab = logits.shape[-1]
    k = top_k
    short = logits.element_size() == 2
    ref = logits if short else logits.float() / temperature
    ref_values, ids = torch.topk(ref, k, dim=-1)
    values = ref_values.float() / temperature if short else ref_values
    length = _prefix_length(values, top_p)
    edge = ref_values.gather(-1, length - 1)
    above = ref_values > edge
    need = length - above.sum(dim=-1, keepdim=True)  # how many tied with the edge are kept
    neg_ids = -torch.arange(vocab, device=logits.device, dtype=torch.int32)
    tied = torch.where(ref == edge, neg_ids, torch.iinfo(torch.int32).min)
    tied_ids = -torch.topk(tied, k, dim=-1).values.long()  # ascending ids
    slots = torch.arange(k, device=logits.device)
    edge_value = values.gather(-1, length - 1)
    weights = torch.cat([values.masked_fill(~above, -math.inf),
                         edge_value.expand(-1, k).masked_fill(slots >= need, -math.inf)], dim=-1)
    return torch.cat([ids, tied_ids], dim=-1), torch.softmax(weights, dim=-1)


def sample(probs: torch.Tensor, generator=None, ids: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row of ``probs`` [..., V] (any nonnegative weights, unnormalised is fine)
    by the exponential race ``argmax(p / E)``, E ~ Exp(1) i.i.d.: exact for a categorical,
    no host sync (``torch.multinomial`` checks its input on the host), graph-capturable.
    ``ids``: the token of each slot of a sparse row (:func:`sparse_filtered`)."""
    race = torch.empty_like(probs, dtype=torch.float32).exponential_(generator=generator)
    # E = 0 would make 0/0 = NaN, which argmax takes for the maximum
    pick = (probs / race.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(dim=-1)
    return pick if ids is None else ids.gather(-1, pick[..., None])[..., 0]


def _mass_at(probs: torch.Tensor, ids: torch.Tensor | None, tokens: torch.Tensor):
    """Row i's probability of ``tokens[i]``: probs [n, V] dense, or sparse over ``ids``."""
    if ids is None:
        return probs.gather(-1, tokens[:, None])[:, 0]
    return (probs * (ids == tokens[:, None])).sum(dim=-1)


def greedy_accept(proposals: torch.Tensor, target_logits: torch.Tensor):
    """proposals [b-1], target_logits [b, V] -> (accepted count tensor, posterior [b])."""
    posterior = target_logits.argmax(dim=-1)
    matches = (proposals == posterior[:-1]).to(torch.int64)
    accepted = torch.cumprod(matches, dim=0).sum()
    return accepted, posterior


def speculative_accept(proposals: torch.Tensor, draft_probs: torch.Tensor,
                       target_probs: torch.Tensor, generator=None, draft_ids=None,
                       target_ids=None):
    """Standard speculative sampling over one block, exact for the target distribution.

    proposals [b-1] drawn from draft_probs [b-1, V]; target_probs [b, V] (row i is the target
    distribution for the token after block slot i). Returns (accepted count a, next tokens [b])
    where next_tokens[a] is the token to emit after the ``a`` accepted proposals: the residual
    sample ``max(0, p - q)`` at the first rejection, or a bonus sample from the last row when
    all are accepted. Only that row is drawn (every entry holds the same token). Device ops
    only (the fused sampling cycle captures it); b = 1 is a plain sample of the one row.
    ``draft_ids``/``target_ids`` (both or neither): the rows are sparse over these tokens
    (:func:`sparse_filtered`); the residual lives on p's support, so it stays sparse.
    """
    n = proposals.shape[0]
    p_x = _mass_at(target_probs[:n], None if target_ids is None else target_ids[:n], proposals)
    q_x = _mass_at(draft_probs, draft_ids, proposals)
    u = torch.rand(n, device=proposals.device, generator=generator)
    accept = (u * q_x < p_x).to(torch.int64)  # u < p/q without dividing by zero
    accepted = torch.cumprod(accept, dim=0).sum()
    # the row after the accepted prefix; past the last proposal q is 0 (the bonus row is p)
    row = accepted.reshape(1)
    p_row = target_probs.index_select(0, row)
    p_ids = None if target_ids is None else target_ids.index_select(0, row)
    residual = p_row
    if n > 0:
        q_sel = accepted.clamp_max(n - 1).reshape(1)
        q_row = draft_probs.index_select(0, q_sel) * (accepted < n)
        if p_ids is not None:  # q's mass at each of p's slots
            same = draft_ids.index_select(0, q_sel)[:, None, :] == p_ids[:, :, None]
            q_row = (q_row[:, None, :] * same).sum(dim=-1)
        residual = (p_row - q_row).clamp_min(0)
        # Zero residual mass means p == q there, so acceptance was certain: any row is fine.
        residual = torch.where(residual.sum() > 0, residual, p_row)
    token = sample(residual, generator, p_ids)[0]  # the race needs no normalisation
    return accepted, token.expand(n + 1)


# --- multi-round speculative sampling (several proposals for one position) -------------------

def residual_chain(target_probs: torch.Tensor, proposal_probs):
    """Residuals ``r_0 = p, r_i = norm(max(0, r_{i-1} - q_i))`` of multi-round sampling.

    Returns ``(residuals, certain)``: ``residuals[i]`` is the distribution that round ``i + 1``
    tests against (``residuals[k]`` is the final one) and ``certain`` [k] (bool tensor) marks
    the rounds that cannot reject (``max(0, r - q)`` has zero mass, so ``r == q``). After such
    a round the residual is kept as it was (any valid distribution would do: nobody gets past
    that round). The chain does not depend on the drawn tokens and needs no host sync.
    """
    r = target_probs.to(torch.promote_types(target_probs.dtype, torch.float32))
    r = r / r.sum()
    residuals, certain = [r], []
    for q in proposal_probs:
        rest = (r - q.to(r.dtype)).clamp_min(0)
        mass = rest.sum()
        zero = mass <= 0
        r = torch.where(zero, r, rest / mass.clamp_min(torch.finfo(r.dtype).tiny))
        residuals.append(r)
        certain.append(zero)
    flags = torch.stack(certain) if certain else torch.zeros(0, dtype=torch.bool, device=r.device)
    return residuals, flags


def multiround_accept_batch(target_probs: torch.Tensor, proposal_probs, num_draws: int,
                            generator=None, proposal_tokens: torch.Tensor | None = None):
    """``num_draws`` independent runs of :func:`multiround_accept`, vectorised, no host sync.

    Returns ``(tokens [N], rounds [N])`` (int64); ``rounds`` is 1-based, ``k + 1`` for the
    final residual. ``proposal_tokens`` [k, N] may supply the proposals (each row drawn from
    the matching ``proposal_probs[i]``, independently of everything else); else they are drawn.
    """
    qs = list(proposal_probs)
    k = len(qs)
    residuals, certain = residual_chain(target_probs, qs)
    device = target_probs.device
    n = int(num_draws)
    tokens = torch.full((n,), -1, dtype=torch.int64, device=device)
    rounds = torch.full((n,), k + 1, dtype=torch.int64, device=device)
    undecided = torch.ones(n, dtype=torch.bool, device=device)
    for i, q in enumerate(qs):
        r = residuals[i]
        q = q.to(r.dtype)
        if proposal_tokens is not None:
            t = proposal_tokens[i].to(device=device, dtype=torch.int64).reshape(n)
        else:
            t = torch.multinomial(q, n, replacement=True, generator=generator)
        u = torch.rand(n, device=device, generator=generator, dtype=r.dtype)
        # accept with probability min(1, r(t)/q(t)), written without a division; a certain
        # round (r == q) accepts even where rounding makes r(t) a hair below q(t)
        take = undecided & ((u * q[t] < r[t]) | certain[i])
        tokens = torch.where(take, t, tokens)
        rounds = torch.where(take, torch.full_like(rounds, i + 1), rounds)
        undecided = undecided & ~take
    final = torch.multinomial(residuals[k], n, replacement=True, generator=generator)
    tokens = torch.where(undecided, final, tokens)
    return tokens, rounds


def multiround_accept(target_probs: torch.Tensor, proposal_probs, generator=None,
                      proposal_tokens=None) -> tuple[int, int]:
    """Multi-round exact speculative sampling for one position.

    ``target_probs`` [V] is the target distribution ``p``; ``proposal_probs`` a list of [V]
    proposal distributions ``q_1..q_k``. Round i draws ``t_i ~ q_i`` (or takes
    ``proposal_tokens[i]``, which must have been drawn from ``q_i`` independently of everything
    the caller conditions on) and accepts it with probability ``min(1, r(t_i)/q_i(t_i))``,
    ``r`` starting as ``p``; on rejection ``r <- norm(max(0, r - q_i))``; when every round
    rejects, the token is drawn from the final ``r``. The token is distributed exactly as ``p``
    (see docs/MULTIROUND.md). Returns ``(token_id, round_index)``: the 1-based accepting round,
    or ``len(proposal_probs) + 1`` when the token came from the final residual.
    """
    qs = list(proposal_probs)
    toks = None
    if proposal_tokens is not None:
        toks = torch.as_tensor(list(proposal_tokens) if not torch.is_tensor(proposal_tokens)
                               else proposal_tokens, dtype=torch.int64).reshape(len(qs), 1)
    tokens, rounds = multiround_accept_batch(target_probs, qs, 1, generator, toks)
    token, rnd = torch.cat([tokens, rounds]).tolist()  # the one host read
    return token, rnd
