"""First-use tuning of the skinny GEMM configs for (GPU, shape) pairs without a tuned table.

``Engines.ensure`` calls ``ensure_tuned(models, device)`` before it builds the fused layers
(their gate/up interleave follows the configs). Every decode GEMM shape that neither this
GPU's own shipped table (``configs/skinny_gemm_<gpu>.json``; the H100 fallback does not count)
nor this machine's cache holds is timed once: ~30 configs and cuBLAS at M = 1 and 16, inside
CUDA graphs over enough weight copies that none stays in L2, within a whole-model budget
(``DFLASH_AUTOTUNE_BUDGET_S``, default 50 s; shapes left over keep the heuristic and are tuned
on a later run). Results go to ``$DFLASH_CACHE_DIR`` / ``$XDG_CACHE_HOME/dflash`` /
``~/.cache/dflash``, ``skinny_gemm/<gpu>__driver-<v>__triton-<v>__torch-<v>.json``, which
``gemm_configs.tuned_table`` merges over the shipped table. ``DFLASH_AUTOTUNE=0`` turns it off.
See docs/AUTOTUNE.md. CLI: ``python -m dflash.engine.cuda.autotune --shape N,K ...``.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import gemm_configs, kernels
from .gemm_configs import heuristic_config, valid_config

MS = (1, 16)  # the decode batch sizes a config must serve (one config per (N, K))
CUBLAS_MARGIN = 1.03  # cuBLAS must win by more than this to take a shape
TILES = [(16, 256), (16, 512), (32, 64), (32, 128), (32, 256), (32, 512), (64, 64),
         (64, 128), (64, 256), (128, 64), (128, 128)]
SPLITS = (1, 2, 4, 8, 16)
COARSE = 24  # (tile, split) pairs timed first; then warps/stages around the best two
# Roles (see decode_shapes). q/k/v and gate/up run unsplit in the fused layer (layer._gemm),
# gate/up also needs whole gate/up chunk pairs (layer.gate_up_chunk); a None (cuBLAS) config
# for any layer GEMM would turn the whole fused layer off, which costs more than it gains, and
# for the MoE router it would lose row invariance (cuBLAS picks kernels by M: routing by block).
UNSPLIT = {"qkv", "gate_up"}
KEEP_TRITON = {"qkv", "o", "gate_up", "down", "router"}

_attempted: set[tuple[str, int, int]] = set()  # (gpu, N, K) tuned (or tried) in this process


# ----------------------------------------------------------------------------- shapes
@dataclass
class GemmShape:
    """One weight shape [N, K] of the decode path; ``count``: such weights per step."""
    n: int
    k: int
    roles: set[str] = field(default_factory=set)
    count: int = 0

    @property
    def key(self) -> tuple[int, int]:
        return self.n, self.k


def _rows(*modules) -> tuple[int, int] | None:
    """(sum of out features, in features) of modules with 2-D weights of one K, else None
    (MoE experts are 3-D, linear-attention layers have no q/k/v projections)."""
    shapes = []
    for mod in modules:
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            return None
        shapes.append(tuple(w.shape))
    if not shapes or len({k for _, k in shapes}) != 1:
        return None
    return sum(n for n, _ in shapes), shapes[0][1]


def _layer_weights(layer):
    """(role, (N, K)) of one decoder layer as graphs.FusedLayer fuses it."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    get = lambda mod, *names: [getattr(mod, n, None) for n in names]  # noqa: E731
    for role, mods in (("qkv", get(attn, "q_proj", "k_proj", "v_proj")),
                       ("o", get(attn, "o_proj")),
                       ("gate_up", get(mlp, "gate_proj", "up_proj")),
                       ("down", get(mlp, "down_proj")),
                       # an MoE block's router (cuda/moe.py; Qwen3: mlp.gate, GPT-OSS: mlp.router)
                       ("router", [] if hasattr(mlp, "gate_proj") else
                        [getattr(mlp, "gate", None) or getattr(mlp, "router", None)])):
        shape = _rows(*mods)
        if shape:
            yield role, shape


def _model_weights(model):
    """(role, (N, K)) of every 2-D weight the fast engine multiplies per decode step."""
    from ...model.draft import DFlashDraft
    from ..static import decoder_parts

    if isinstance(model, DFlashDraft):  # engine/draft.py: fc, per-layer k/v, layers; target's head
        fc = _rows(model.fc)
        if fc:
            yield "fc", fc
        for layer in model.layers:
            kv = _rows(getattr(layer.self_attn, "k_proj", None), getattr(layer.self_attn, "v_proj", None))
            if kv:
                yield "kv", kv
        layers, head = model.layers, None
    else:
        _, layers, _, head, _ = decoder_parts(model)
    for layer in layers:
        yield from _layer_weights(layer)
    if head is not None and _rows(head):
        yield "lm_head", _rows(head)


def decode_shapes(models) -> list[GemmShape]:
    """The distinct decode GEMM shapes of ``models`` (target, draft), most bytes per step first."""
    shapes: dict[tuple[int, int], GemmShape] = {}
    for model in models:
        for role, (n, k) in _model_weights(model):
            s = shapes.setdefault((n, k), GemmShape(n, k))
            s.roles.add(role)
            s.count += 1
    return sorted(shapes.values(), key=lambda s: -s.count * s.n * s.k)


# ----------------------------------------------------------------------------- candidates
def _programs(n: int, cfg) -> int:
    return -(-n // cfg[0]) * cfg[2]


def allowed(shape: GemmShape, cfg) -> bool:
    """Whether the engines can run ``cfg`` for every role of ``shape``."""
    bn, bk, split, warps, _ = cfg
    if not valid_config(shape.n, shape.k, cfg) or bn * bk > 16384 or (warps == 8 and bn < 64):
        return False
    if shape.roles & UNSPLIT and split != 1:
        return False
    return not ("gate_up" in shape.roles and (bn % 2 or shape.n % bn))


def _near(shape: GemmShape, sms: int):
    """Sort key: program count closest to ~4 waves (what the heuristic aims at)."""
    return lambda cfg: abs(math.log2(_programs(shape.n, cfg) / (4 * sms)))


def coarse_candidates(shape: GemmShape, sms: int, prior=None) -> list[tuple]:
    """The heuristic, the fallback table's config, then (tile, split) pairs at 4 warps."""
    def fit(cfg):  # the fused layer runs q/k/v and gate/up unsplit anyway
        return (*cfg[:2], 1, *cfg[3:]) if cfg and shape.roles & UNSPLIT else cfg

    grid = [(bn, bk, split, 4, 3 if bn * bk >= 16384 else 4)
            for (bn, bk), split in itertools.product(TILES, SPLITS)]
    grid = sorted((c for c in grid if allowed(shape, c)), key=_near(shape, sms))
    first = [fit(c) for c in (heuristic_config(shape.n, shape.k, sms), prior) if c]
    out = []
    for cfg in first + grid:
        if cfg not in out and allowed(shape, cfg):
            out.append(cfg)
    return out[:COARSE]


def refinements(shape: GemmShape, cfg) -> list[tuple]:
    """Warps/stages variants of one (tile, split)."""
    bn, bk, split = cfg[:3]
    return [c for c in ((bn, bk, split, w, s) for w in (4, 8) for s in (3, 4, 5))
            if c != tuple(cfg) and allowed(shape, c)]


def tune_shape(shape: GemmShape, sms: int, timer, deadline: float, prior=None):
    """(config or None = cuBLAS, finished) for one shape. ``timer(cfg, m)``: microseconds per
    call (cfg None: cuBLAS), or None if the config fails. A config is scored by its summed time
    at M = 1 and 16. Unfinished (deadline passed): (None, False), nothing to keep."""
    scores: dict[tuple, float] = {}

    def measure(cfgs) -> bool:
        for cfg in cfgs:
            if time.monotonic() > deadline:
                return False
            if cfg not in scores:
                times = [timer(cfg, m) for m in MS]
                scores[cfg] = math.inf if None in times else sum(times)
        return True

    if not measure(coarse_candidates(shape, sms, prior)):
        return None, False
    top = sorted((c for c in scores if scores[c] < math.inf), key=scores.get)[:2]
    if not measure([c for cfg in top for c in refinements(shape, cfg)]):
        return None, False
    best = min(scores, key=scores.get, default=None)
    if best is None or scores[best] == math.inf:
        return None, True  # nothing compiles or computes right here: cuBLAS
    if shape.roles & KEEP_TRITON:
        return best, True
    cublas = [timer(None, m) for m in MS]
    if None not in cublas and sum(cublas) * CUBLAS_MARGIN < scores[best]:
        return None, True
    return best, True


# ----------------------------------------------------------------------------- GPU timing
def graph_time_us(calls, reps: int = 7) -> float:
    """Median per-call time (us) of a CUDA graph running ``calls`` back to back (the way a
    graphed decode step runs them: no launch overhead in the way)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile / warm up outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / len(calls))
    return sorted(times)[len(times) // 2]


class GpuTimer:
    """``timer(cfg, m)`` for one shape: random weights (copies spanning several L2 sizes),
    results checked against an fp32 reference."""

    def __init__(self, n: int, k: int, device: torch.device, dtype: torch.dtype):
        props = torch.cuda.get_device_properties(device)
        nbytes = n * k * torch.finfo(dtype).bits // 8
        span = max(4 * getattr(props, "L2_cache_size", 50 << 20), 256 << 20)
        room = torch.cuda.mem_get_info(device)[0] // 4
        copies = max(1, min(16, -(-span // nbytes), room // nbytes))
        gen = torch.Generator(device=device).manual_seed(0)
        self.ws = [torch.randn(n, k, device=device, dtype=dtype, generator=gen) * 0.02
                   for _ in range(copies)]
        self.xs = {m: torch.randn(m, k, device=device, dtype=dtype, generator=gen) for m in MS}
        self.refs = {m: torch.cat([F.linear(x.float(), rows.float()) for rows in self.ws[0].split(8192)],
                                  dim=1) for m, x in self.xs.items()}  # fp32, a slice at a time
        start = time.perf_counter()
        while time.perf_counter() - start < 0.05:  # lift the clocks from idle: the first config
            for w in self.ws:                    # timed (the heuristic) would look slow
                F.linear(self.xs[16], w)
            torch.cuda.synchronize(device)

    def __call__(self, cfg, m: int) -> float | None:
        x = self.xs[m]
        if cfg is None:
            return graph_time_us([lambda w=w: F.linear(x, w) for w in self.ws])
        try:
            ref = self.refs[m]
            err = (kernels.skinny_matmul(x, self.ws[0], cfg).float() - ref).abs().max().item()
            if err > 1e-2 * ref.abs().max().item() + 1e-2:
                return None
            return graph_time_us([lambda w=w: kernels.skinny_matmul(x, w, cfg) for w in self.ws])
        except Exception:  # noqa: BLE001 - a config that does not compile here (e.g. too much smem)
            return None


# ----------------------------------------------------------------------------- entry points
def enabled(device) -> bool:
    return (os.environ.get("DFLASH_AUTOTUNE", "1") != "0" and kernels.triton is not None
            and kernels.ENABLED and torch.device(device).type == "cuda" and torch.cuda.is_available())


def _budget_s() -> float:
    return float(os.environ.get("DFLASH_AUTOTUNE_BUDGET_S", "50"))


def _dtype(models) -> torch.dtype | None:
    for model in models:
        for p in model.parameters():
            if p.dim() == 2 and p.is_floating_point():
                return p.dtype
    return None


def tune_shapes(shapes: list[GemmShape], device, dtype=torch.bfloat16, *, force: bool = False,
                budget_s: float | None = None) -> dict:
    """Tune the shapes this GPU has no config for (``force``: all of them), cache the results.
    Returns {(N, K): config or None} of what was tuned now."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    gpu = torch.cuda.get_device_name(index)
    known = {} if force else {**gemm_configs.shipped_table(gpu), **gemm_configs.cached_table(gpu)}
    todo = [s for s in shapes if s.key not in known and (force or (gpu, *s.key) not in _attempted)]
    if not todo:
        return {}
    _attempted.update((gpu, *s.key) for s in todo)  # once per process: configs stay put in a run
    budget = _budget_s() if budget_s is None else budget_s
    print(f"tuning {len(todo)} GEMM shape{'s' if len(todo) != 1 else ''} for {gpu} (first use, cached in {gemm_configs.cache_path(gpu)})",
          file=sys.stderr, flush=True)
    start = time.monotonic()
    with torch.cuda.device(index):
        tuned, out_of_time = _tune_each(todo, index, dtype, start + budget)
    line = f"  tuned {len(tuned)}/{len(todo)} shapes in {time.monotonic() - start:.0f} s"
    if out_of_time:
        line += (f"; budget of {budget:.0f} s reached: {len(todo) - len(tuned)} keep the heuristic "
                 "this run (tuned on a later run; DFLASH_AUTOTUNE_BUDGET_S raises it)")
    _progress(line, end=True)
    if tuned:
        gemm_configs.store(gpu, tuned)
    return tuned


def _tune_each(todo: list[GemmShape], index: int, dtype, deadline: float):
    """({(N, K): config} of the shapes finished before ``deadline``, whether it ran out)."""
    sms = torch.cuda.get_device_properties(index).multi_processor_count
    fallback = gemm_configs.load_table(gemm_configs.TABLE_PATH)  # a good first guess on most GPUs
    start, tuned = time.monotonic(), {}
    for i, shape in enumerate(todo):
        if time.monotonic() > deadline:
            return tuned, True
        try:
            timer = make_timer(shape.n, shape.k, torch.device("cuda", index), dtype)
        except torch.cuda.OutOfMemoryError:
            gemm_configs._warn_once(f"oom:{shape.key}", f"no room to tune {shape.n}x{shape.k}: heuristic kept")
            continue
        cfg, done = tune_shape(shape, sms, timer, deadline, fallback.get(shape.key))
        del timer
        if not done:
            return tuned, True
        tuned[shape.key] = cfg
        _progress(f"  {i + 1}/{len(todo)} {shape.n}x{shape.k}: {cfg or 'cuBLAS'}, "
                  f"{time.monotonic() - start:.0f} s")
    return tuned, False


def make_timer(n: int, k: int, device: torch.device, dtype: torch.dtype):
    return GpuTimer(n, k, device, dtype)


def _progress(line: str, end: bool = False) -> None:
    """A \\r counter on a terminal; only the final line otherwise."""
    if sys.stderr.isatty():
        print("\r" + line.ljust(78), end="\n" if end else "", file=sys.stderr, flush=True)
    elif end:
        print(line, file=sys.stderr, flush=True)


def ensure_tuned(models, device) -> None:
    """Tune (once, cached) the decode GEMM shapes of ``models`` that have no config yet.
    A no-op without CUDA/Triton, with DFLASH_AUTOTUNE=0 or DFLASH_SKINNY_GEMM=0, for 32-bit
    models, and (without file I/O) once everything is tuned."""
    if not enabled(device):
        return
    dtype = _dtype(models)
    if dtype not in (torch.bfloat16, torch.float16):
        return
    tune_shapes(decode_shapes(models), device, dtype)


# ----------------------------------------------------------------------------- CLI
def _meta_model(name_or_path: str):
    """A target or DFlash draft of a checkpoint's config, on the meta device (shapes only)."""
    config_file = Path(name_or_path) / "config.json"
    if config_file.exists() and "dflash_config" in json.loads(config_file.read_text()):
        from ...model.draft import DFlashDraft

        with torch.device("meta"):
            return DFlashDraft.from_config(config_file)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name_or_path))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", default=[], metavar="N,K[:ROLE]",
                   help="a weight shape; ROLE (qkv, gate_up, o, down, lm_head, ...) sets the "
                        "constraints (default: lm_head, i.e. any split, cuBLAS allowed)")
    p.add_argument("--model", action="append", default=[],
                   help="a checkpoint folder or hub id (target or DFlash draft): its shapes")
    p.add_argument("--force", action="store_true", help="re-tune shapes that have configs")
    p.add_argument("--budget", type=float, default=None, help="seconds (DFLASH_AUTOTUNE_BUDGET_S)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = p.parse_args(argv)
    if not enabled("cuda"):
        sys.exit("autotune needs CUDA, Triton, DFLASH_AUTOTUNE!=0 and DFLASH_SKINNY_GEMM!=0")
    shapes = decode_shapes([_meta_model(m) for m in args.model])
    for spec in args.shape:
        nk, _, role = spec.partition(":")
        n, k = (int(v) for v in nk.split(","))
        shapes.append(GemmShape(n, k, {role or "lm_head"}, 1))
    t0 = time.monotonic()
    tuned = tune_shapes(shapes, "cuda", getattr(torch, args.dtype), force=args.force,
                        budget_s=args.budget)
    gpu = torch.cuda.get_device_name()
    print(json.dumps({"gpu": gpu, "seconds": round(time.monotonic() - t0, 1),
                      "cache": str(gemm_configs.cache_path(gpu)),
                      "tuned": {f"{n},{k}": cfg for (n, k), cfg in tuned.items()},
                      "configs": {f"{s.n},{s.k}": gemm_configs.config_for(s.n, s.k) for s in shapes}}))


if __name__ == "__main__":
    main()
