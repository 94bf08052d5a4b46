"""python -m dflash.perf: the decoding engines measured against the weight-read floor.

On one GPU, in one run: copy bandwidth and the floor it implies for one decoding step; the
bf16 GEMM rate and the compute floor it implies for a prefill; for each engine (fast: static
cache + fused/compiled math + CUDA graphs; hf: eager Transformers), the autoregressive step at
several context lengths, prefill at several prompt lengths, verify and draft time per block
size, the whole cycle inside the real decoding loop, c(b) = cycle / AR step, and projected
tokens/s at a given tau. Models: a named target shape (Qwen3-4B, Qwen3-8B, Llama-3.1-8B) or
any local config.json, random bf16 weights, with the real 4B draft config fitted to it. Then
end to end on the embedded tiny pair (real tau). Writes JSON + Markdown.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ..decoding.loop import SpeculativeDecoder
from ..model.draft import DFlashDraft
from ..errors import UserError, parse_int_list, run_cli
from ..runlog import atomic_write_json, atomic_write_text

QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True)
# Published configs (HF config.json): Qwen/Qwen3-8B and meta-llama/Llama-3.1-8B.
QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False)
LLAMA31_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0,
                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=8192))
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e6,
            max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True)
DRAFT_4B = Path(__file__).parent / "configs" / "qwen3-4b-dflash-b16.config.json"
SHAPES = {"qwen3-4b": QWEN3_4B, "qwen3-8b": QWEN3_8B, "llama-3.1-8b": LLAMA31_8B, "tiny": TINY}
_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim")


def load_shape(spec: str) -> tuple[str, dict]:
    """(label, config kwargs incl. model_type) for a shape name or a local config.json (or a
    checkpoint directory holding one; a multimodal config's text_config is used)."""
    if spec in SHAPES:
        return spec, dict({"model_type": "qwen3"}, **SHAPES[spec])
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"--shape {spec}: not a known shape and no config.json there",
                        f"use one of {', '.join(SHAPES)} or a path to a config.json")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--shape {spec}: cannot read {path}: {e}") from None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else cfg
    if not isinstance(cfg, dict) or "model_type" not in cfg or any(
            k not in cfg for k in _SHAPE_KEYS[:5]):
        raise UserError(f"--shape {spec}: {path} is not a causal LM config (needs model_type, "
                        f"{', '.join(_SHAPE_KEYS[:5])})")
    drop = {"architectures", "auto_map", "transformers_version", "quantization_config", "dtype",
            "torch_dtype"}
    return cfg.get("_name_or_path") or path.parent.name or str(path), \
        {k: v for k, v in cfg.items() if k not in drop}


def shape_dims(cfg) -> dict:
    """The sizes the draft config and the FLOP count need, from a transformers config."""
    heads = cfg.num_attention_heads
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                num_attention_heads=heads,
                num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)


def _prefill_cell(ms, floor) -> str:
    return "-" if ms is None else f"{ms:.2f} ({100 * floor / ms:.0f}% of floor)"


def _cell(value) -> str:
    """A table cell: 2 decimals, or '-' where an engine did not time that case."""
    return "-" if value is None else f"{value:.2f}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, iters: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in ms, synchronised around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def copy_bandwidth(device, gib: float = 2.0) -> float:
    """Device-to-device copy rate in bytes/s, counting read + write."""
    n = int(gib * 2**30) // 2
    x = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device, iters=10)
    return 2 * x.numel() * 2 / (ms / 1000)


def gemm_rate(device, n: int | None = None) -> float:
    """Dense matmul rate in FLOP/s (bf16 on CUDA, float32 on CPU): the compute ceiling a
    prefill is measured against (a large square GEMM, as fast as this device multiplies)."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 512)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, iters=10 if cuda else 3)
    return 2 * n ** 3 / (ms / 1000)


def prefill_flops(dims: dict, tokens: int) -> float:
    """FLOPs of a causal prefill of ``tokens`` tokens: 2 per weight per token for every
    matrix a token multiplies (layers + LM head, not the embedding lookup), plus causal
    attention (QK^T and PV over the lower triangle: 2 * 2 * T^2 / 2 per head dim)."""
    h, i, L = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    qd = dims["num_attention_heads"] * dims["head_dim"]
    kvd = dims["num_key_value_heads"] * dims["head_dim"]
    per_layer = h * (qd + 2 * kvd) + qd * h + 3 * h * i
    weights = L * per_layer + h * dims["vocab_size"]
    attention = L * 2 * tokens * tokens * qd  # 4 T^2 qd / 2 for causal
    return 2 * weights * tokens + attention


@torch.inference_mode()
def measure_prefill(name, target, device, lengths, iters) -> dict:
    """Prefill time of ``lengths`` prompt tokens on engine ``name`` (the loop's own first
    forward: eager, logits of every position, features, KV written), median ms."""
    dec = SpeculativeDecoder(target, None, engine=name)
    dec.reserve(max(lengths) + 64)
    tgt = dec.engines.target_engine
    vocab = target.config.vocab_size
    out = {}
    for n in lengths:
        ids = torch.randint(0, vocab - 2, (1, n), device=device)
        pos = torch.arange(n, device=device)
        out[n] = time_ms(lambda: tgt.forward(ids, pos, kv_len=n), device, iters, warmup=2)
    del dec, tgt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def draft_config(shape: dict) -> dict:
    """The real 4B draft config fitted to the target ``shape``."""
    draft_cfg = json.loads(DRAFT_4B.read_text())
    n_layers = shape["num_hidden_layers"]
    draft_cfg.update({k: shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                            "num_key_value_heads", "head_dim", "vocab_size")})
    draft_cfg["num_target_layers"] = n_layers
    if n_layers != 36:
        draft_cfg["dflash_config"]["target_layer_ids"] = [1, n_layers // 2, n_layers - 3]
        draft_cfg["num_hidden_layers"] = 3
        if "layer_types" in draft_cfg:  # one entry per draft layer (transformers checks it)
            draft_cfg["layer_types"] = draft_cfg["layer_types"][:3]
    draft_cfg["dflash_config"]["mask_token_id"] = shape["vocab_size"] - 1
    return draft_cfg


def build_models(shape: dict, device, dtype):
    """A random target of ``shape`` (config kwargs; ``model_type`` defaults to qwen3) and the
    real 4B draft config fitted to it; 2-D weights ~ N(0, 0.02)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(shape)
    cfg = AutoConfig.for_model(kw.pop("model_type", "qwen3"), **kw)
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs, in its dtype: no slow CPU init
        target = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    target.generation_config.eos_token_id = None
    draft_cfg = draft_config(shape_dims(target.config))
    with torch.device(device):
        draft = DFlashDraft.from_config(draft_cfg).to(dtype).eval()
        draft.inv_freq = draft.inv_freq.float()
    with torch.no_grad():  # random but well-scaled weights
        for p in list(target.parameters()) + list(draft.parameters()):
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return target, draft


def weight_bytes(module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


@torch.inference_mode()
def measure_engine(name, target, draft, device, contexts, block_sizes, iters, loop_tokens, tau):
    dec = SpeculativeDecoder(target, draft, engine=name)
    cap = max(contexts) + loop_tokens + 2 * max(block_sizes) + 64
    dec.reserve(cap)
    tgt, drf = dec.engines.target_engine, dec.engines.draft_engine
    vocab = target.config.vocab_size
    kv = (lambda n: n) if name == "hf" or not dec.graphs else (lambda n: None)
    out = {"engine": name, "ar_step_ms": {}, "verify_ms": {}, "draft_ms": {}, "cycle_ms": {}}
    c_ref = contexts[0]
    for c in contexts:
        ids = torch.randint(0, vocab - 2, (1, c), device=device)
        tgt.forward(ids, torch.arange(c, device=device), kv_len=c)
        tok = ids[:, -1:]
        pos = torch.tensor([c], device=device)
        out["ar_step_ms"][c] = time_ms(lambda: tgt.forward(tok, pos, kv_len=kv(c + 1)), device, iters)
    ids = torch.randint(0, vocab - 2, (1, c_ref), device=device)
    _, feats = tgt.forward(ids, torch.arange(c_ref, device=device), kv_len=c_ref)
    drf.append_context(feats, torch.arange(c_ref, device=device))
    for b in block_sizes:
        block = torch.randint(0, vocab - 2, (1, b), device=device)
        pos = torch.arange(c_ref, c_ref + b, device=device)
        out["verify_ms"][b] = time_ms(lambda: tgt.forward(block, pos, kv_len=kv(c_ref + b)),
                                      device, iters)
        f = feats[:, :b]

        def draft_step():
            drf.append_context(f, pos)
            drf.propose_logits(block, pos, kv_len=kv(c_ref + b))

        out["draft_ms"][b] = time_ms(draft_step, device, iters)
    prompt = torch.randint(0, vocab - 2, (1, c_ref), device=device)
    for b in [1] + list(block_sizes):
        dec.generate(prompt, 8, block_size=b)  # warm (captures graphs for this block size)
        res = dec.generate(prompt, loop_tokens, block_size=b)
        cycles = [c.cycle_s for c in res.cycles]
        out["cycle_ms"][b] = 1000 * statistics.median(cycles)
    ar = out["cycle_ms"][1]
    out["c_of_b"] = {b: out["cycle_ms"][b] / ar for b in block_sizes}
    big = max(block_sizes)
    out["projected_tokens_per_s"] = {"tau": tau, "block_size": big,
                                     "value": 1000 * tau / out["cycle_ms"][big],
                                     "baseline": 1000 / ar}
    del dec, tgt, drf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


@torch.inference_mode()
def embedded_end_to_end(device, dtype, engines, n_prompts, max_new):
    from . import common as bench
    from ..datasets import load_prompts

    pair = bench.load_pair("embedded", "embedded", device, str(dtype).replace("torch.", ""))
    prompts, _ = load_prompts("builtin-code", n_prompts)
    stops = bench.stop_token_ids(pair)
    encoded = [torch.tensor([bench.encode_chat(pair.tokenizer, [{"role": "user", "content": p["turns"][0]}])],
                            device=device) for p in prompts]
    results = {}
    for name in engines:
        dec = SpeculativeDecoder(pair.target, pair.draft, engine=name)
        dec.reserve(max(e.shape[1] for e in encoded) + max_new + 64)
        for b in (1, pair.draft.block_size):
            dec.generate(encoded[0], 16, block_size=b, stop_token_ids=stops)
        row = {}
        outs = {}
        for b in (1, pair.draft.block_size):
            gens = [dec.generate(e, max_new, block_size=b, stop_token_ids=stops) for e in encoded]
            tokens = sum(g.num_tokens for g in gens)
            wall = sum(g.total_s for g in gens)
            cyc = sum(len(g.cycles) for g in gens)
            row[b] = {"tokens_per_s": tokens / wall, "tpot_ms": 1000 * sum(g.decode_s for g in gens)
                      / max(1, tokens - len(gens)),
                      "tau": sum(c.tau for g in gens for c in g.cycles) / max(1, cyc)}
            outs[b] = [g.output_ids for g in gens]
        same = [a == b for a, b in zip(outs[1], outs[pair.draft.block_size])]
        firsts = []
        for a, b in zip(outs[1], outs[pair.draft.block_size]):
            d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            if d is None and len(a) != len(b):
                d = min(len(a), len(b))
            firsts.append(d)
        results[name] = {"modes": row, "speedup": row[pair.draft.block_size]["tokens_per_s"]
                         / row[1]["tokens_per_s"], "identical_share": sum(same) / len(same),
                         "first_divergence": firsts}
    return results


# DFlash 2 row (issue 22). No DFlash 2 draft is released at the 4B shape; these are
# documented choices for the settings the reference reads from dflash_config: 4 conv taps,
# groups of 64 channels (40 groups at H=2560), selector rank 64 over the top 8 candidates.
DFLASH2_SETTINGS = dict(conv_kernel_size=4, conv_group_size=64, selector_rank=64, selector_top_k=8)
DFLASH2_TARGET_RATIO = 1.05  # acceptance 3: DFlash 2 cycle within 1.05x of DFlash 1 at b16


def build_dflash2_draft(shape: dict, draft1, device, dtype, settings=DFLASH2_SETTINGS):
    """The 4B draft config as DFlash 2: draft1's weights plus random convs and selector."""
    cfg = draft_config(shape)
    cfg["architectures"] = ["DFlash2DraftModel"]
    cfg["dflash_config"].update(settings, block_size=int(cfg.get("block_size", 16)))
    with torch.device(device):
        draft = DFlashDraft.from_config(cfg).to(dtype).eval()
    draft.load_state_dict(draft1.state_dict(), strict=False)
    draft.inv_freq = draft1.inv_freq
    gen = torch.Generator(device).manual_seed(1)
    with torch.no_grad():
        for layer in draft.layers:
            for conv in (layer.attention_conv, layer.mlp_conv):
                conv.base_kernel.normal_(0, 0.05, generator=gen)
                conv.base_kernel[:, 0] += 1.0  # near the identity, as a converted draft starts
                conv.kernel_projection.weight.normal_(0, 0.02, generator=gen)
        for p in draft.candidate_selector.parameters():
            p.normal_(0, 0.02, generator=gen)
    return draft


@torch.inference_mode()
def measure_dflash2(target, draft1, draft2, device, context, block_size, iters, loop_tokens,
                    rounds: int = 3, check_tokens: int = 64, engine: str = "fast"):
    """DFlash 1 and DFlash 2 drafts on the fast engine, measured side by side: draft time
    (context append + proposals: the logits' argmax / the selector's walk), loop cycle at b=1
    and b=block_size (rounds interleaved so that clock drift hits both alike), c(b), and
    greedy speculative output against AR."""
    from ..engine.cuda.dflash2 import chain_convs
    from ..engine.cuda.layer import dflash2_chain_supported, layer_kernels_enabled

    vocab = target.config.vocab_size
    prompt = torch.randint(0, vocab - 2, (1, context), device=device,
                           generator=torch.Generator(device).manual_seed(0))
    decs = {"dflash1": SpeculativeDecoder(target, draft1, engine=engine),
            "dflash2": SpeculativeDecoder(target, draft2, engine=engine)}
    out = {name: {} for name in decs}
    b = block_size
    pos = torch.arange(context, context + b, device=device)
    block = torch.randint(0, vocab - 2, (1, b), device=device)
    for name, dec in decs.items():
        dec.reserve(context + max(loop_tokens, check_tokens) + 2 * b + 64)
        tgt, drf = dec.engines.target_engine, dec.engines.draft_engine
        kv = None if dec.graphs else context + b
        _, feats = tgt.forward(prompt, torch.arange(context, device=device), kv_len=context)
        drf.append_context(feats, torch.arange(context, device=device))
        f = feats[:, :b]

        def draft_step():
            drf.append_context(f, pos)
            drf.propose_tokens(block, pos, kv)

        out[name]["draft_ms"] = time_ms(draft_step, device, iters)
        for size in (1, b):
            dec.generate(prompt, 8, block_size=size)  # warm (captures graphs for this size)
    cycles = {name: {1: [], b: []} for name in decs}
    for _ in range(rounds):
        for name, dec in decs.items():
            for size in (1, b):
                res = dec.generate(prompt, loop_tokens, block_size=size)
                cycles[name][size] += [c.cycle_s for c in res.cycles]
    ar_ids = decs["dflash1"].generate(prompt, check_tokens, block_size=1).output_ids
    for name, dec in decs.items():
        r = out[name]
        r["cycle_ms"] = {size: 1000 * statistics.median(v) for size, v in cycles[name].items()}
        r["c_of_b"] = r["cycle_ms"][b] / r["cycle_ms"][1]
        spec = dec.generate(prompt, check_tokens, block_size=b)
        r["greedy_identical_to_ar"] = spec.output_ids == ar_ids
        r["first_divergence"] = next((i for i, (x, y) in enumerate(zip(spec.output_ids, ar_ids))
                                      if x != y), None)
        r["mean_tau"] = spec.mean_tau
    x = torch.zeros(b, draft2.config.hidden_size, device=device, dtype=draft2.dtype)
    ratio = out["dflash2"]["cycle_ms"][b] / out["dflash1"]["cycle_ms"][b]
    result = {"settings": dict(DFLASH2_SETTINGS), "context": context, "block_size": b,
              "check_tokens": check_tokens, "rounds": rounds, **out,
              "layer_chain_supported": bool(layer_kernels_enabled()
                                            and dflash2_chain_supported(chain_convs(draft2), x)),
              "cycle_ratio": ratio, "target_ratio": DFLASH2_TARGET_RATIO,
              "within_target": ratio <= DFLASH2_TARGET_RATIO}
    del decs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def dflash2_markdown(r: dict) -> list[str]:
    st, b = r["settings"], r["block_size"]
    d1, d2 = r["dflash1"], r["dflash2"]
    row = lambda label, f: f"| {label} | {f(d1)} | {f(d2)} |"  # noqa: E731
    return ["", f"## DFlash 2 on the fast engine (random weights; conv {st['conv_kernel_size']} "
            f"taps, groups of {st['conv_group_size']}, selector rank {st['selector_rank']}, "
            f"top-{st['selector_top_k']}; context {r['context']})", "",
            "| measure | DFlash 1 | DFlash 2 |", "|---|---|---|",
            row(f"draft b={b}, with proposals (ms)", lambda d: f"{d['draft_ms']:.3f}"),
            row("loop cycle b=1 (ms)", lambda d: f"{d['cycle_ms'][1]:.2f}"),
            row(f"loop cycle b={b} (ms)", lambda d: f"{d['cycle_ms'][b]:.2f}"),
            row(f"c({b}) = cycle / AR cycle", lambda d: f"{d['c_of_b']:.2f}"),
            row(f"greedy == AR ({r['check_tokens']} tokens)",
                lambda d: "yes" if d["greedy_identical_to_ar"]
                else f"NO (first divergence {d['first_divergence']})"),
            row("mean tau (random weights)", lambda d: f"{d['mean_tau']:.2f}"), "",
            f"DFlash 2 / DFlash 1 cycle at b={b}: {r['cycle_ratio']:.3f} (target <= "
            f"{r['target_ratio']}: {'met' if r['within_target'] else 'NOT met'}); Triton layer "
            f"chain for DFlash 2: {'yes' if r['layer_chain_supported'] else 'no'}."]


def markdown(report: dict) -> str:
    env = report["environment"]
    versions = ", ".join(f"{k} {env[k + '_version']}" for k in
                         ("torch", "cuda", "triton", "transformers", "driver") if env.get(k + "_version"))
    lines = [f"# Decoding engine performance ({report['shape']} target, {env['gpu_name']})", "",
             f"Date {report['date']}; {versions}. Command: `{report['command']}`.", "",
             f"- copy bandwidth (read+write): {report['copy_bandwidth_tb_s']:.2f} TB/s",
             f"- target weights: {report['target_weight_gb']:.2f} GB -> floor per step "
             f"{report['floor_ms']:.2f} ms; draft + LM head: {report['draft_weight_gb']:.2f} GB "
             f"-> {report['draft_floor_ms']:.2f} ms"]
    if report.get("gemm_tflop_s"):
        lines.append(f"- dense GEMM rate: {report['gemm_tflop_s']:.3g} TFLOP/s -> the prefill "
                     "compute floor (weights' FLOPs + causal attention at that rate)")
    lines.append("")
    engines = report["engines"]
    names = [e["engine"] for e in engines]
    lines += ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in engines[0]["ar_step_ms"]:
        lines.append(f"| AR step, context {c} (ms) | " +
                     " | ".join(_cell(e['ar_step_ms'].get(c)) for e in engines) + " |")
    floors = report.get("prefill_floor_ms") or {}
    for n in engines[0].get("prefill_ms", {}):
        lines.append(f"| prefill {n} tokens (ms; compute floor {floors[n]:.2f}) | " +
                     " | ".join(_prefill_cell(e.get("prefill_ms", {}).get(n), floors[n])
                                for e in engines) + " |")
    for key, label in (("verify_ms", "verify"), ("draft_ms", "draft"), ("cycle_ms", "loop cycle")):
        for b in engines[0][key]:
            lines.append(f"| {label} b={b} (ms) | " +
                         " | ".join(_cell(e[key].get(b)) for e in engines) + " |")
    for b in engines[0]["c_of_b"]:
        lines.append(f"| c({b}) = cycle / AR step | " +
                     " | ".join(_cell(e['c_of_b'].get(b)) for e in engines) + " |")
    lines.append(f"| projected tok/s at tau {engines[0]['projected_tokens_per_s']['tau']} | " +
                 " | ".join(f"{e['projected_tokens_per_s']['value']:.0f}" for e in engines) + " |")
    lines.append("| AR baseline tok/s (loop) | " +
                 " | ".join(f"{e['projected_tokens_per_s']['baseline']:.0f}" for e in engines) + " |")
    if len(engines) > 1:
        b = max(engines[0]["cycle_ms"])
        lines += ["", f"Cycle speed-up of {names[0]} over {names[1]} at b={b}: "
                  f"{engines[1]['cycle_ms'][b] / engines[0]['cycle_ms'][b]:.1f}x"]
    if report.get("embedded"):
        lines += ["", "## End to end, embedded tiny pair (builtin-code, greedy)", "",
                  "| engine | AR tok/s | DFlash tok/s | speedup | tau | identical to AR |",
                  "|---|---|---|---|---|---|"]
        for name, r in report["embedded"].items():
            m = r["modes"]
            bs = max(m)
            lines.append(f"| {name} | {m[1]['tokens_per_s']:.0f} | {m[bs]['tokens_per_s']:.0f} | "
                         f"{r['speedup']:.2f}x | {m[bs]['tau']:.2f} | "
                         f"{100 * r['identical_share']:.0f}% (first divergences {r['first_divergence']}) |")
    if report.get("dflash2"):
        lines += dflash2_markdown(report["dflash2"])
    return "\n".join(lines) + "\n"


def read_bytes_per_step(target) -> int:
    """Weight bytes one decode step reads: every weight once, except an untied input
    embedding table (a step reads one row of it)."""
    embed = target.get_input_embeddings().weight
    head = target.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    return weight_bytes(target) - (0 if tied else embed.numel() * embed.element_size())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dflash.perf", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen3-4b", metavar="NAME|PATH",
                   help=f"target shape: {', '.join(SHAPES)}, or a local config.json (or a "
                        "directory holding one); random weights either way (default qwen3-4b)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--engines", default="fast,hf")
    p.add_argument("--contexts", default="512,1024,2048")
    p.add_argument("--prefill-lengths", default="512,2048,8192",
                   help="prompt lengths whose prefill is timed ('' = none)")
    p.add_argument("--prefill-iters", type=int, default=5)
    p.add_argument("--block-sizes", default=",".join(str(b) for b in range(2, 17)))
    p.add_argument("--hf-block-sizes", default="2,4,8,16", help="block sizes timed for the slow hf path")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--loop-tokens", type=int, default=48)
    p.add_argument("--tau", type=float, default=7.47, help="acceptance length for the projection")
    p.add_argument("--skip-embedded", action="store_true")
    p.add_argument("--only-embedded", action="store_true", help="skip the random-weight engine timings")
    p.add_argument("--embedded-prompts", type=int, default=8)
    p.add_argument("--embedded-max-new", type=int, default=256)
    p.add_argument("--skip-dflash2", action="store_true",
                   help="skip the DFlash 2 row (fast engine, largest block size)")
    p.add_argument("--out-dir", default="outputs/perf")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("python -m dflash.perf needs a CUDA GPU", "run it on a GPU machine, or --device cpu --shape tiny")
    contexts = parse_int_list(args.contexts, "--contexts", minimum=1, example="512,2048")
    prefill_lengths = parse_int_list(args.prefill_lengths, "--prefill-lengths", minimum=1,
                                     example="512,2048,8192") if args.prefill_lengths else []
    engines = [e for e in args.engines.split(",") if e]
    label, shape = load_shape(args.shape)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from .common import environment_info

    report = {"command": "python -m dflash.perf " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "shape": label,
              "environment": environment_info(device)}
    bw = copy_bandwidth(device, 2.0 if device.type == "cuda" else 0.25)
    report["engines"] = []
    if args.only_embedded:
        report["embedded"] = embedded_end_to_end(device, dtype, engines,
                                                 args.embedded_prompts, args.embedded_max_new)
        atomic_write_json(Path(args.out_dir) / "perf_embedded.json", report)
        print(json.dumps(report["embedded"], indent=1))
        return 0
    target, draft = build_models(shape, device, dtype)
    dims = shape_dims(target.config)
    t_bytes = read_bytes_per_step(target)
    head = target.get_output_embeddings().weight
    d_bytes = weight_bytes(draft) + head.numel() * head.element_size()
    rate = gemm_rate(device) if prefill_lengths else None
    report.update(dims=dims, model_type=target.config.model_type,
                  copy_bandwidth_tb_s=bw / 1e12, target_weight_gb=t_bytes / 1e9,
                  draft_weight_gb=d_bytes / 1e9, floor_ms=1000 * t_bytes / bw,
                  draft_floor_ms=1000 * d_bytes / bw,
                  gemm_tflop_s=rate / 1e12 if rate else None,
                  prefill_floor_ms={n: 1000 * prefill_flops(dims, n) / rate
                                    for n in prefill_lengths} if rate else {})
    print(f"{label}: copy {bw / 1e12:.2f} TB/s; floor {report['floor_ms']:.2f} ms/step"
          + (f"; GEMM {rate / 1e12:.3g} TFLOP/s" if rate else ""), flush=True)
    out = Path(args.out_dir)
    for name in engines:
        sizes = [int(b) for b in (args.block_sizes if name != "hf" else args.hf_block_sizes).split(",")]
        t0 = time.time()
        r = measure_engine(name, target, draft, device, contexts, sizes,
                           args.iters if name != "hf" else max(3, args.iters // 6),
                           args.loop_tokens if name != "hf" else 16, args.tau)
        r["prefill_ms"] = measure_prefill(name, target, device, prefill_lengths,
                                          args.prefill_iters if name != "hf" else 2)
        r["measure_s"] = time.time() - t0
        report["engines"].append(r)
        print(f"{name}: AR {r['ar_step_ms']} ms; cycle {r['cycle_ms']}; c(b) "
              f"{ {b: round(v, 2) for b, v in r['c_of_b'].items()} }; prefill {r['prefill_ms']} ms; "
              f"projected {r['projected_tokens_per_s']['value']:.0f} tok/s ({r['measure_s']:.0f} s)",
              flush=True)
        atomic_write_json(out / "perf.json", report)  # what is measured survives a failure below
    if not args.skip_dflash2 and "fast" in engines:
        t0 = time.time()
        draft2 = build_dflash2_draft(dims, draft, device, dtype)
        big = max(int(b) for b in args.block_sizes.split(","))
        d2 = measure_dflash2(target, draft, draft2, device, contexts[0], big, args.iters,
                             args.loop_tokens)
        d2["measure_s"] = time.time() - t0
        report["dflash2"] = d2
        atomic_write_json(out / "perf.json", report)
        print(f"dflash2: cycle b={big} {d2['dflash2']['cycle_ms'][big]:.2f} ms vs DFlash 1 "
              f"{d2['dflash1']['cycle_ms'][big]:.2f} ms: ratio {d2['cycle_ratio']:.3f} (target <= "
              f"{d2['target_ratio']}); greedy == AR: DFlash 1 "
              f"{d2['dflash1']['greedy_identical_to_ar']}, DFlash 2 "
              f"{d2['dflash2']['greedy_identical_to_ar']} ({d2['measure_s']:.0f} s)", flush=True)
        del draft2
    del target, draft
    if not args.skip_embedded:
        report["embedded"] = embedded_end_to_end(device, dtype, engines,
                                                 args.embedded_prompts, args.embedded_max_new)
    atomic_write_json(out / "perf.json", report)
    md = markdown(report)
    atomic_write_text(out / "PERFORMANCE.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    run_cli(main)
