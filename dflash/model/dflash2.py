"""DFlash 2 parts: grouped dynamic causal convolutions and the candidate selector.

Architecture as the reference ``DFlash2DraftModel`` of dflash==0.1.0 runs it (see
``shared/reference/upstream-dflash-0.1.0.md``, "DFlash 2"):

- every draft layer wraps attention (``attention_conv``) and the MLP (``mlp_conv``) in a
  grouped dynamic causal convolution over the *block* positions: ``prepare`` convolves the
  sublayer's normed input with ``base_kernel[0]`` plus a per-position kernel projected from
  that input, ``finish`` convolves the sublayer's output with ``base_kernel[1]`` plus the
  second half of the same projection;
- the candidate selector walks the block from the anchor token, choosing among each
  position's top-k draft tokens with ``unary + <pred(prev) * proj(h), succ(cand)>``.

``grouped_dynamic_conv`` and ``select_walk`` are the math (torch, device ops only);
``dflash.engine.cuda.dflash2`` offers the same two functions with CUDA kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The DFlash 2 settings a config must carry (in dflash_config, per the reference).
DFLASH2_KEYS = ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")
ARCHITECTURE = "DFlash2DraftModel"
# Checkpoints name the codebooks with or without ``.weight`` (the reference maps bare names).
CODEBOOKS = ("candidate_selector.predecessor_codebook", "candidate_selector.successor_codebook")


def grouped_dynamic_conv(x: torch.Tensor, dyn: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_{o<K} (base[o] + dyn[t, o, g(c)]) * x[t-o], x = 0 before the block start.

    x: [..., t, H]; dyn: [..., t, K, G] (taken at the output position, shared by the H/G
    channels of group g = c // (H/G)); base: [K, H]. Returns x's shape and dtype."""
    k_size, hidden = base.shape
    groups = dyn.shape[-1]
    t = x.shape[-2]
    xg = x.reshape(*x.shape[:-1], groups, hidden // groups)
    base = base.to(x.dtype).view(k_size, groups, hidden // groups)
    out = torch.zeros_like(xg)
    for o in range(min(k_size, t)):  # offsets past the block length only see zeros
        shifted = xg if o == 0 else F.pad(xg[..., :t - o, :, :], (0, 0, 0, 0, o, 0))
        out = out + base[o] * shifted
        out = torch.addcmul(out, dyn[..., o, :, None].to(x.dtype), shifted)
    return out.view_as(x)


def select_walk(unary: torch.Tensor, cand: torch.Tensor, hproj: torch.Tensor,
                pred_w: torch.Tensor, succ_w: torch.Tensor, anchor: torch.Tensor,
                temperature: float, uniforms: torch.Tensor | None = None, generator=None):
    """The selector's walk over t block positions from ``anchor`` -> (tokens [t], q [t, k]).

    unary [t, k] float32 (the candidates' raw logits), cand [t, k] int64 token ids, hproj
    [t, r] (hidden_projection of the final-normed block states), pred_w/succ_w [V, r].
    score_c = unary[c] + <pred_w[prev] * hproj[pos], succ_w[cand[pos, c]]>; greedy (T <= 0):
    argmax, q None; T > 0: q = softmax(score / T), index = first i with cumsum(q)[i] > u
    (u = uniforms[pos], else drawn with ``generator``). Device ops only (no host sync)."""
    t, k = unary.shape
    succ = F.embedding(cand, succ_w)  # [t, k, r]
    prev = anchor.reshape(1)
    sampling = temperature > 0
    if sampling and uniforms is None:
        uniforms = torch.rand(t, generator=generator, device=unary.device)
    tokens, qs = [], []
    for pos in range(t):
        a = F.embedding(prev, pred_w) * hproj[pos]  # [1, r]
        score = unary[pos] + (succ[pos] @ a[0]).float()  # [k]
        if sampling:
            q = torch.softmax(score / temperature, dim=-1)
            # first index whose cumulative mass exceeds u (clamped against rounding at 1)
            idx = (q.cumsum(-1) <= uniforms[pos]).sum(-1, keepdim=True).clamp_max(k - 1)
            qs.append(q)
        else:
            idx = score.argmax(-1, keepdim=True)
        prev = cand[pos].gather(0, idx)
        tokens.append(prev)
    return torch.cat(tokens), (torch.stack(qs) if sampling else None)


class DynamicConv(nn.Module):
    """A grouped dynamic causal convolution (checkpoint names ``base_kernel`` [2, K, H],
    ``kernel_projection.weight`` [2*K*G, H]); ``group_size`` channels share a dynamic tap."""

    def __init__(self, hidden_size: int, kernel_size: int, group_size: int):
        super().__init__()
        self.kernel_size, self.groups = kernel_size, hidden_size // group_size
        self.base_kernel = nn.Parameter(torch.zeros(2, kernel_size, hidden_size))
        self.kernel_projection = nn.Linear(hidden_size, 2 * kernel_size * self.groups, bias=False)

    def prepare(self, x: torch.Tensor, conv=grouped_dynamic_conv):
        """Normed sublayer input x [..., t, H] -> (convolved x, the finish kernel [..., t, K, G])."""
        dyn = self.kernel_projection(x).view(*x.shape[:-1], 2, self.kernel_size, self.groups)
        return conv(x, dyn[..., 0, :, :], self.base_kernel[0]), dyn[..., 1, :, :]

    def finish(self, y: torch.Tensor, dyn: torch.Tensor, conv=grouped_dynamic_conv):
        """The sublayer's output y with the kernel ``prepare`` returned."""
        return conv(y, dyn, self.base_kernel[1])


class CandidateSelector(nn.Module):
    """``hidden_projection`` (H -> r, no bias), ``predecessor_codebook`` and
    ``successor_codebook`` ([V, r] embeddings), over the top ``top_k`` draft tokens."""

    def __init__(self, hidden_size: int, vocab_size: int, rank: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.hidden_projection = nn.Linear(hidden_size, rank, bias=False)
        self.predecessor_codebook = nn.Embedding(vocab_size, rank)
        self.successor_codebook = nn.Embedding(vocab_size, rank)

    def candidates(self, logits: torch.Tensor, topk=None):
        """Draft logits [t, V] -> (unary [t, k] float32, candidate ids [t, k]), best first.
        ``topk(logits, k)`` -> (values float32, ids int64) may replace torch.topk (a kernel)."""
        if topk is not None:
            return topk(logits, self.top_k)
        unary, cand = torch.topk(logits, self.top_k, dim=-1)
        return unary.float(), cand

    def propose(self, hidden: torch.Tensor, logits: torch.Tensor, anchor: torch.Tensor,
                temperature: float, uniforms=None, generator=None, walk=select_walk,
                topk=None):
        """hidden [t, H] (final-normed block states past the anchor), logits [t, V] ->
        (tokens [t], candidate ids [t, k], q [t, k] or None when greedy)."""
        unary, cand = self.candidates(logits, topk=topk)
        hproj = self.hidden_projection(hidden)
        tokens, q = walk(unary, cand, hproj, self.predecessor_codebook.weight,
                         self.successor_codebook.weight, anchor, temperature,
                         uniforms=uniforms, generator=generator)
        return tokens, cand, q


def rename_codebooks(state: dict) -> dict:
    """Checkpoint state with the codebooks' bare names mapped to ``.weight``."""
    return {(k + ".weight" if k in CODEBOOKS else k): v for k, v in state.items()}


def dflash2_from_dflash1(draft, conv_kernel_size: int = 4, conv_group_size: int | None = None,
                         selector_rank: int = 16, selector_top_k: int = 8, seed: int = 0,
                         noise: float = 0.1):
    """A DFlash 2 draft initialised from a (trained) DFlash 1 ``draft`` (a ``DFlashDraft``).

    The DFlash 1 weights are copied; every conv starts near the identity (``base_kernel[.][0]``
    = 1, other taps 0, kernel projections N(0, (noise/H)^2)); the selector is small and random
    (codebooks N(0, 1), hidden projection N(0, noise^2/H): pair scores of order
    noise*sqrt(rank) logits, so the walk sometimes leaves the argmax). Used by tests (random
    DFlash 2 checkpoints that still accept well) and as a training initialisation."""
    cfg = draft.config.to_dict()
    hidden = int(cfg["hidden_size"])
    group = conv_group_size or hidden
    cfg["architectures"] = [ARCHITECTURE]
    cfg["dflash_config"] = dict(cfg.get("dflash_config") or {}, conv_kernel_size=conv_kernel_size,
                                conv_group_size=group, selector_rank=selector_rank,
                                selector_top_k=selector_top_k, block_size=draft.block_size)
    config = type(draft.config).from_dict(cfg)
    gen = torch.Generator().manual_seed(seed)
    new = type(draft)(config).to(dtype=torch.float32)
    missing, unexpected = new.load_state_dict(
        {k: v.detach().float().cpu() for k, v in draft.state_dict().items()}, strict=False)
    assert not unexpected, unexpected
    with torch.no_grad():
        for layer in new.layers:
            for conv in (layer.attention_conv, layer.mlp_conv):
                conv.base_kernel.zero_()
                conv.base_kernel[:, 0] = 1.0
                w = conv.kernel_projection.weight
                w.copy_(torch.randn(w.shape, generator=gen) * (noise / hidden))
        sel = new.candidate_selector
        for emb in (sel.predecessor_codebook, sel.successor_codebook):
            emb.weight.copy_(torch.randn(emb.weight.shape, generator=gen))
        w = sel.hidden_projection.weight
        w.copy_(torch.randn(w.shape, generator=gen) * (noise / hidden ** 0.5))
    return new.to(dtype=draft.dtype, device=draft.device).eval()
