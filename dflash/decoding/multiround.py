"""Multi-round exact speculative sampling with a DFlash draft: a faithful decoder and a tree one.

Multi-round sampling (``dflash.sampling.multiround_accept``) gives one position several
proposal distributions ``q_1..q_k``. Round i draws ``t_i ~ q_i`` and accepts it with
probability ``min(1, r(t_i)/q_i(t_i))``, ``r`` starting as the target distribution ``p``; on
rejection ``r <- norm(max(0, r - q_i))``; if every round rejects, the token is drawn from the
final ``r``. Here round i's proposals come from the draft run with block size ``b_i`` (the
``--round-block-sizes`` list): a DFlash draft predicts the whole block in one non-causal pass,
so its distribution for a slot depends on the block size (the number of mask tokens it sees).

Exactness of one position (the residual identity). With ``r`` the current residual and ``q``
a round's proposal: P(round accepts token x) = ``q(x) min(1, r(x)/q(x)) = min(q(x), r(x))``;
P(round rejects) = ``1 - sum_x min(q, r) = sum_x max(0, r - q) = m``. So
``P(emit x) = min(q(x), r(x)) + m * r'(x)`` where ``r'`` is what the remaining rounds emit;
if the remaining rounds emit exactly ``r' = max(0, r - q)/m`` this is
``min(q, r) + max(0, r - q) = r(x)``. By induction from the last round (which emits its
residual exactly, since it is sampled), the emitted token is distributed as ``p``. When
``m = 0`` (``r == q``) rejection has probability 0 and the chain stops there. A proposal with
mass where ``r`` has none is always rejected there and leaves ``r`` unchanged there.

``faithful`` decoder (``mode="faithful"``): exactly the spec -- one target step per emitted
token. Each step runs the draft once per round with block ``[last, MASK x (b_i - 1)]`` and
takes its block-slot-1 distribution at temperature T as ``q_i``; the target's next-token
distribution is ``p``. It measures the per-round acceptance probabilities; it cannot be fast
(one target pass per token, plus k draft passes), which is what the research fork observed.

``tree`` decoder (``mode="tree"``): one target pass per cycle, like single-round speculative
sampling, but over a tree. Round i samples a branch ``y_i = (y_i^1..y_i^{b_i-1})``, each slot
``y_i^d ~ q_i^d`` (the draft's slot-d distribution at block size ``b_i``), independently.
Branches are merged into a trie (equal prefixes share nodes) rooted at the last emitted token;
the target verifies every node in ONE forward pass (tree attention: a node sees the committed
context plus its own ancestors; a node at depth d sits at position ``start + d``). Then the
walk, at depth d with accepted prefix ``a_1..a_{d-1}`` (a trie node with target distribution
``p_d``): the candidate rounds are the *alive* branches -- those whose first ``d-1`` tokens
equal the accepted prefix and which still have a slot at depth d -- in round order; their
depth-d tokens go through multi-round acceptance against ``p_d``. If a round accepts, the walk
moves to that child node (the alive set shrinks to branches carrying the same token); if all
reject, the residual sample is the cycle's last token; if no branch is alive (all ended) the
last token is a bonus sample from ``p_d``. Pathwise, the tree walk accepts at least as long a
prefix as single-round sampling of branch 1 alone (same decisions while branch 1 is alive; more
chances when it is rejected), so it emits at least as many tokens per target pass.

Why the tree stays exact. The multi-round identity needs, at each depth d, that conditionally
on everything the walk has looked at so far (the history ``H_d``: earlier cycles, tokens and
uniforms used at depths < d, which branches are alive), each candidate's token ``y_i^d`` is
distributed as the ``q_i^d`` used in the test, independently across candidates. The DFlash
draft is non-autoregressive: all slot distributions of a block come from one pass conditioned
on the context only, and the slots are sampled independently, so ``y_i^d`` is independent of
``y_i^1..y_i^{d-1}`` and of every other branch. ``H_d`` is a function of the depth-<d tokens,
the uniforms and the context only; hence given ``H_d`` (in particular given "branch i shares
the accepted prefix"), ``y_i^d`` still has law ``q_i^d``, independent of the other candidates.
The walk at depth d is therefore an ordinary multi-round draw against ``p_d = p(. | context,
a_<d)`` (the trie node's target distribution, exact because tree attention shows that node
exactly its prefix), and emits a token with law ``p_d`` given ``H_d``. Chaining the depths and
cycles, the emitted sequence has the target's law. Two details keep it so: a branch rejected at
depth d is never alive below d (a rejected token t had ``r(t) < q(t)``, so every later residual
has ``r(t) = 0`` and t cannot be emitted at that depth), so no token that the walk has already
looked at is reused; and a branch that shares the prefix only by chance (its token equal to one
accepted from another round) is fine, because that event involves its depth-<d tokens only.
(With an autoregressive draft the same holds if ``q_i^d`` is the branch's own conditional, which
for an alive branch is the conditional given the accepted prefix; DFlash needs no such care.)

Top-p / top-k (``generate(top_p=, top_k=)``): ``p`` (every node's, in the tree) and every
``q_i`` are the filtered distributions of ``dflash.decoding.sampling.probs_at``. Nothing above
asks anything of the ``q_i`` beyond being what the tokens were drawn from, so both modes emit
the filtered target's law exactly.

After the walk the accepted path's target KV is copied to contiguous slots (``move_slots``) and
its target features are appended to the draft's context, exactly as a linear cycle would.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..engine.select import Engines, synchronize
from ..errors import UserError
from .result import CycleStat, GenerationResult, emit
from .sampling import check_sampling, multiround_accept, probs_at

MODES = ("faithful", "tree")


@dataclass
class MultiRoundResult(GenerationResult):
    """A generation plus multi-round statistics.

    ``round_attempts[i]`` / ``round_accepts[i]``: how often round i+1's proposal was tested /
    accepted. ``residual_draws``: positions where every tested round rejected (token from the
    final residual). ``bonus_draws``: positions with no proposal left (tree: every alive branch
    ended), sampled from the target directly. ``target_passes`` counts the prefill too.
    """
    round_attempts: list[int] = field(default_factory=list)
    round_accepts: list[int] = field(default_factory=list)
    residual_draws: int = 0
    bonus_draws: int = 0
    target_passes: int = 0
    tree_nodes: int = 0  # total tokens verified in tree passes (tree mode)

    @property
    def round_histogram(self) -> list[int]:
        """Accepting round counts: rounds 1..k, then residual, then bonus."""
        return list(self.round_accepts) + [self.residual_draws, self.bonus_draws]


def token_dist(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
               top_k: int = 0) -> torch.Tensor:
    """(Filtered) sampling distribution at ``temperature``; one-hot argmax at temperature 0."""
    if temperature > 0:
        return probs_at(logits, temperature, top_p, top_k)
    out = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    return out.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)


# ------------------------------------------------------------------------------ the tree
@dataclass
class Tree:
    """A trie of branches under a root (node 0). Node n > 0 carries ``tokens[n]``."""
    tokens: list[int]        # node token (root: the last emitted token)
    parents: list[int]       # parent node (root: -1)
    depths: list[int]        # root 0
    branch_nodes: list[list[int]]  # branch i's node at depth d is branch_nodes[i][d-1]

    def __len__(self) -> int:
        return len(self.tokens)

    def attention_mask(self, device=None) -> torch.Tensor:
        """[T, T] bool: node a may attend to node b iff b is a or an ancestor of a."""
        n = len(self.tokens)
        rows = [[False] * n for _ in range(n)]
        for a in range(n):  # parents come before their children
            if a:
                rows[a][:a] = rows[self.parents[a]][:a]
            rows[a][a] = True
        mask = torch.tensor(rows, dtype=torch.bool)
        return mask.to(device) if device is not None else mask


def build_tree(root_token: int, branch_tokens: list[list[int]]) -> Tree:
    """Merge branches (token lists, one per round) into a trie; branch 0's nodes come first."""
    tokens, parents, depths = [int(root_token)], [-1], [0]
    children: list[dict[int, int]] = [{}]
    branch_nodes = []
    for toks in branch_tokens:
        node, path = 0, []
        for d, tok in enumerate(toks, start=1):
            tok = int(tok)
            nxt = children[node].get(tok)
            if nxt is None:
                nxt = len(tokens)
                tokens.append(tok)
                parents.append(node)
                depths.append(d)
                children.append({})
                children[node][tok] = nxt
            node = nxt
            path.append(node)
        branch_nodes.append(path)
    return Tree(tokens, parents, depths, branch_nodes)


@dataclass
class WalkResult:
    tokens: list[int]           # accepted tokens then the last (residual or bonus) token
    path: list[int]             # accepted nodes (root excluded), len(tokens) - 1 of them
    attempts: list[int]         # per round: proposals tested
    accepts: list[int]          # per round: proposals accepted
    residual: int = 0           # 1 if the last token came from a residual
    bonus: int = 0              # 1 if the last token came from p with no proposal left


def candidates(tree: Tree) -> list[list[int]]:
    """Per node: the rounds whose branch passes through it and goes deeper, in round order.

    These are exactly the branches "alive" when the walk stands on that node: a branch shares
    the accepted prefix iff it passes through the node that prefix ends at.
    """
    out = [[] for _ in range(len(tree))]
    for i, nodes in enumerate(tree.branch_nodes):
        for d in range(len(nodes)):
            parent = 0 if d == 0 else nodes[d - 1]
            out[parent].append(i)
    return out


def walk_tree(tree: Tree, node_probs: torch.Tensor, branch_probs: list[torch.Tensor],
              generator=None) -> WalkResult:
    """Accept a path through ``tree`` by multi-round sampling at each depth (exact; see module).

    ``node_probs`` [T, V]: target distribution of the token after each node (row 0: root).
    ``branch_probs[i]`` [L_i, V]: the distribution branch i's depth-d token was drawn from is
    row d-1 (drawn independently of everything else). Branch tokens are read off the tree.

    Because the alive rounds at a node depend on the node only (:func:`candidates`), the
    multi-round draw of every node is computed at once on the device, each node with its own
    fresh uniforms and residual sample; the walk then follows the outcomes from the root with
    one host read. Outcomes of nodes off the path are never looked at, so this has the law of
    :func:`walk_tree_sequential`.
    """
    device = node_probs.device
    k = len(branch_probs)
    n = len(tree)
    cands = candidates(tree)
    width = max((len(c) for c in cands), default=0)
    r = node_probs.to(torch.promote_types(node_probs.dtype, torch.float32))
    r = r / r.sum(-1, keepdim=True)
    taken = torch.full((n,), -1, dtype=torch.int64, device=device)  # accepting slot per node
    if width:
        rows, slots, branch, depth, toks = [], [], [], [], []
        for node, cs in enumerate(cands):
            for j, i in enumerate(cs):
                rows.append(node)
                slots.append(j)
                branch.append(i)
                depth.append(tree.depths[node])
                toks.append(tree.tokens[tree.branch_nodes[i][tree.depths[node]]])
        offsets = [0]
        for b in branch_probs:
            offsets.append(offsets[-1] + b.shape[0])
        flat_q = torch.cat([b.to(r.dtype) for b in branch_probs], dim=0)  # [sum L_i, V]
        pick = torch.tensor([offsets[b] + d for b, d in zip(branch, depth)], device=device)
        q = torch.zeros(n, width, r.shape[-1], dtype=r.dtype, device=device)
        valid = torch.zeros(n, width, dtype=torch.bool, device=device)
        tok = torch.zeros(n, width, dtype=torch.int64, device=device)
        idx = (torch.tensor(rows, device=device), torch.tensor(slots, device=device))
        q[idx] = flat_q[pick]
        valid[idx] = True
        tok[idx] = torch.tensor(toks, device=device)
        u = torch.rand(n, width, device=device, generator=generator, dtype=r.dtype)
        undecided = torch.ones(n, dtype=torch.bool, device=device)
        for j in range(width):
            qj = q[:, j]
            t = tok[:, j:j + 1]
            rest = (r - qj).clamp_min(0)
            mass = rest.sum(-1, keepdim=True)
            certain = (mass <= 0).squeeze(-1)
            ok = (u[:, j] * qj.gather(1, t).squeeze(1) < r.gather(1, t).squeeze(1)) | certain
            take = undecided & valid[:, j] & ok
            taken = torch.where(take, torch.full_like(taken, j), taken)
            undecided = undecided & ~take
            move = valid[:, j] & ~certain
            r = torch.where(move[:, None], rest / mass.clamp_min(torch.finfo(r.dtype).tiny), r)
    last = torch.multinomial(r, 1, generator=generator).squeeze(-1)  # final residual per node
    taken_h, last_h = torch.stack([taken, last]).tolist()  # the walk's one host read
    attempts, accepts = [0] * k, [0] * k
    node, out, path = 0, [], []
    while True:
        cs, j = cands[node], taken_h[node]
        if j < 0:
            for i in cs:
                attempts[i] += 1
            return WalkResult(out + [last_h[node]], path, attempts, accepts,
                              residual=int(bool(cs)), bonus=int(not cs))
        for i in cs[:j + 1]:
            attempts[i] += 1
        winner = cs[j]
        accepts[winner] += 1
        node = tree.branch_nodes[winner][tree.depths[node]]
        out.append(tree.tokens[node])
        path.append(node)


def walk_tree_sequential(tree: Tree, node_probs: torch.Tensor, branch_probs: list[torch.Tensor],
              generator=None) -> WalkResult:
    """Reference walk: one multi-round draw per depth, in order (one host read per depth).

    Same law as :func:`walk_tree`, which the decoder uses; kept as the readable definition.

    ``node_probs`` [T, V]: target distribution of the token after each node (row 0: root).
    ``branch_probs[i]`` [L_i, V]: the distribution branch i's depth-d token was drawn from is
    row d-1 (drawn independently of everything else). Branch tokens are read off the tree.
    """
    k = len(branch_probs)
    attempts, accepts = [0] * k, [0] * k
    node, depth = 0, 1
    alive = [i for i in range(k) if tree.branch_nodes[i]]
    out, path = [], []
    while True:
        cands = [i for i in alive if len(tree.branch_nodes[i]) >= depth]
        p = node_probs[node]
        if not cands:
            tok = int(torch.multinomial(p, 1, generator=generator))
            return WalkResult(out + [tok], path, attempts, accepts, bonus=1)
        toks = [tree.tokens[tree.branch_nodes[i][depth - 1]] for i in cands]
        qs = [branch_probs[i][depth - 1] for i in cands]
        tok, j = multiround_accept(p, qs, generator, proposal_tokens=toks)
        for i in cands[:min(j, len(cands))]:
            attempts[i] += 1
        if j > len(cands):
            return WalkResult(out + [tok], path, attempts, accepts, residual=1)
        winner = cands[j - 1]
        accepts[winner] += 1
        node = tree.branch_nodes[winner][depth - 1]
        out.append(tok)
        path.append(node)
        alive = [i for i in cands if tree.tokens[tree.branch_nodes[i][depth - 1]] == tok]
        depth += 1


# ------------------------------------------------------------------------------ decoder
class MultiRoundDecoder:
    """Multi-round speculative sampling with a DFlash draft (``mode``: faithful or tree)."""

    def __init__(self, target, draft, round_block_sizes, mode: str = "tree", engine: str = "auto",
                 compile: bool = True, _cpu_graph_mode: bool = False):
        if draft is None:
            raise UserError("multi-round speculative sampling needs a draft model")
        if getattr(draft, "is_dflash2", False):
            # Its rounds take each block's per-slot draft distributions from one pass; a DFlash 2
            # draft's proposals are a sequential walk whose distributions depend on the tokens
            # drawn before them, which these samplers do not track.
            raise UserError("multi-round speculative sampling does not support DFlash 2 drafts",
                            "use benchmark.py (single-round speculative sampling) for them")
        if mode not in MODES:
            raise UserError(f"unknown mode '{mode}'", f"choose one of {', '.join(MODES)}")
        sizes = [int(b) for b in round_block_sizes]
        if not sizes:
            raise UserError("--round-block-sizes needs at least one block size")
        bad = [b for b in sizes if b < 2]
        if bad:
            raise UserError(f"round block sizes must be >= 2 (a block of 1 proposes nothing), got {bad}")
        engines = Engines(target, draft, engine, feature_layers=draft.target_layer_ids,
                          compile=compile, cpu_draft=False, cpu_graph_mode=_cpu_graph_mode)
        engine = engines.name
        if mode == "tree" and engine == "hf":
            raise UserError("the tree mode needs a static-cache engine (tree attention)",
                            "use --engine auto, fast or static, or --mode faithful")
        draft.check_target(target)
        self.target, self.draft, self.sizes, self.mode = target, draft, sizes, mode
        # fast: fused layer math and CUDA graphs for the fixed-shape steps (draft blocks, draft
        # appends, faithful target steps); the tree verify itself runs the fused math eagerly.
        self.engines, self.device, self.engine_name = engines, engines.device, engines.name
        self.graphs = engines.graphs
        self.feature_layers = draft.target_layer_ids

    def reserve(self, tokens: int) -> None:
        """Allocate caches for sequences up to ``tokens`` long, up front."""
        self.engines.ensure(tokens)

    def _draft_block(self, draft, last, start: int, b: int) -> torch.Tensor:
        """Draft logits [b-1, V] for block ``[last, MASK x (b-1)]`` at ``start..start+b-1``."""
        block = torch.full((1, b), self.draft.mask_token_id, dtype=last.dtype, device=self.device)
        block[0, 0] = last[0]
        pos = torch.arange(start, start + b, device=self.device)
        # graph mode: whole buffer under a positional mask (the block's own KV is written first)
        return draft.propose_logits(block, pos, kv_len=None if self.graphs else start + b)[0]

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 stop_token_ids=None, generator: torch.Generator | None = None,
                 top_p: float = 1.0, top_k: int = 0) -> MultiRoundResult:
        """``top_p`` / ``top_k`` filter the target's ``p`` and every round's ``q_i`` alike
        (both modes): the identity above holds for any ``q_i``, so the emitted tokens follow
        the filtered target distribution; a filtered-out proposal has ``r = 0`` there and is
        always rejected. Ignored at temperature 0 (greedy)."""
        temperature, top_p, top_k = check_sampling(temperature, top_p, top_k)
        dist = lambda logits: token_dist(logits, temperature, top_p, top_k)  # noqa: E731
        ids = input_ids.reshape(-1).to(self.device)
        prompt_len = ids.numel()
        k = len(self.sizes)
        res = MultiRoundResult(output_ids=[], prompt_len=prompt_len, ttft_s=0.0, total_s=0.0,
                               round_attempts=[0] * k, round_accepts=[0] * k)
        if max_new_tokens <= 0:
            return res
        stops = set(int(s) for s in (stop_token_ids or []))
        tree_max = 1 + sum(b - 1 for b in self.sizes)
        target, draft = self.engines.ensure(prompt_len + max_new_tokens + max(tree_max, max(self.sizes)) + 1)

        synchronize(self.device)
        t0 = time.perf_counter()
        positions = torch.arange(prompt_len, device=self.device)
        logits, feats = target.forward(ids[None], positions, kv_len=prompt_len)
        last = torch.multinomial(dist(logits[0, -1]), 1, generator=generator)
        first = int(last.item())
        res.ttft_s = time.perf_counter() - t0
        res.target_passes = 1
        output = [first]
        stopped = first in stops
        draft.append_context(feats, positions)
        start = prompt_len
        step = self._faithful_step if self.mode == "faithful" else self._tree_step
        while not stopped and len(output) < max_new_tokens:
            c0 = time.perf_counter()
            new_tokens, last, start = step(target, draft, last, start, dist, generator, res)
            res.target_passes += 1
            stopped = emit(output, new_tokens, stops, max_new_tokens)
            res.cycles.append(CycleStat(block_size=self.sizes[0] if self.mode == "tree" else 1,
                                        tau=len(new_tokens), cycle_s=time.perf_counter() - c0))
        synchronize(self.device)
        res.total_s = time.perf_counter() - t0
        res.output_ids = output[:max_new_tokens]
        res.stopped = stopped
        return res

    def _faithful_step(self, target, draft, last, start, dist, generator, res):
        """One token: k draft passes (slot 1 of each block size), one target pass."""
        qs = [dist(self._draft_block(draft, last, start, b)[0]) for b in self.sizes]
        pos = torch.arange(start, start + 1, device=self.device)
        t_logits, t_feats = target.forward(last[None], pos, kv_len=None if self.graphs else start + 1)
        p = dist(t_logits[0, 0])
        tok, j = multiround_accept(p, qs, generator)
        k = len(qs)
        for i in range(min(j, k)):
            res.round_attempts[i] += 1
        if j <= k:
            res.round_accepts[j - 1] += 1
        else:
            res.residual_draws += 1
        draft.append_context(t_feats, pos)
        return [tok], torch.tensor([tok], dtype=last.dtype, device=self.device), start + 1

    def _tree_step(self, target, draft, last, start, dist, generator, res):
        """One cycle: k draft passes, one tree verify, a multi-round walk, KV/feature commit."""
        branch_probs, samples = [], []
        for b in self.sizes:
            q = dist(self._draft_block(draft, last, start, b))  # [b-1, V]
            branch_probs.append(q)
            samples.append(torch.multinomial(q, 1, generator=generator).squeeze(-1))
        flat = torch.cat([last] + samples).tolist()  # the cycle's first host read
        root, rest, branch_tokens = flat[0], flat[1:], []
        for b in self.sizes:
            branch_tokens.append(rest[:b - 1])
            rest = rest[b - 1:]
        tree = build_tree(root, branch_tokens)
        n = len(tree)
        node_ids = torch.tensor([tree.tokens], dtype=last.dtype, device=self.device)
        depths = torch.tensor(tree.depths, device=self.device)
        slots = torch.arange(start, start + n, device=self.device)
        t_logits, t_feats = target.forward(node_ids, start + depths, kv_len=start + n,
                                           cache_slots=slots,
                                           tree_mask=tree.attention_mask(self.device))
        res.tree_nodes += n
        walk = walk_tree(tree, dist(t_logits[0]), branch_probs, generator)
        for i in range(len(self.sizes)):
            res.round_attempts[i] += walk.attempts[i]
            res.round_accepts[i] += walk.accepts[i]
        res.residual_draws += walk.residual
        res.bonus_draws += walk.bonus
        path = [0] + walk.path
        m = len(walk.path)
        dst = torch.arange(start, start + m + 1, device=self.device)
        if path != list(range(m + 1)):
            src = torch.tensor(path, device=self.device) + start
            target.move_slots(src[1:], dst[1:])  # the root is already in place
        if self.graphs:
            # One fixed shape for the graph: the path, then filler rows at later positions. Those
            # are overwritten by the next blocks' own keys before any query can see them.
            width = max(self.sizes)
            rows = path + [path[-1]] * (width - len(path))
            draft.append_context(t_feats[:, rows], torch.arange(start, start + width, device=self.device))
        else:
            draft.append_context(t_feats[:, path], dst)
        nxt = walk.tokens[-1]
        return walk.tokens, torch.tensor([nxt], dtype=last.dtype, device=self.device), start + m + 1
