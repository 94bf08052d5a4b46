"""python -m dflash.bench.families: MoE and hybrid target families against the weight-read floor.

For each family (issue 23, acceptance 4): a random-weight bf16 target of the family's real
shape (fewer layers where it does not fit, said in the output), a random 5-layer DFlash draft
of the same hidden size, the engine chosen automatically; measured like ``dflash.perf``:
AR step, b16 verify / draft, the loop cycle at b=1 and b=16, c(16) = cycle(16) / cycle(1),
the weight-read floor of one AR step and of one b16 cycle at the measured device copy rate,
the share of the floor reached, and a greedy identity check (speculative == AR on one
prompt). ``--tiny``: tiny shapes of the same families, runs on CPU (CI).

Floor assumptions: a decode token reads every weight once except the input embedding table
(one row; counted when tied to the LM head), and of each MoE layer the router and shared
weights plus its top-k routed experts. A b16 verify reads the expected number of distinct
experts that 16 tokens touch under uniform, independent routing: E * (1 - (1 - k/E)^16)
(each token picks a uniform k-subset; real routers are correlated and touch fewer). The
cycle floor adds the draft's weights and the LM head read again for the draft's logits.
KV-cache and recurrent-state reads are left out (small at the context used here).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import CliArgumentParser, UserError, run_cli
from ..runlog import atomic_write_json

# Published configs (HF config.json), cited per family:
# - Qwen/Qwen3-30B-A3B: vocab 151936, hidden 2048, intermediate 6144, moe_intermediate 768,
#   48 layers, 32 query / 4 KV heads of 128, 128 experts top-8 (norm_topk_prob), every layer
#   sparse, rope_theta 1e6, rms_norm_eps 1e-6, untied. Qwen/Qwen3-Coder-30B-A3B-Instruct has the
#   same sizes (rope_theta 1e7, 262144 positions); the weights read are identical.
# - openai/gpt-oss-20b: vocab 201088, hidden 2880, intermediate 2880, 24 layers alternating
#   sliding (window 128) / full attention, 64 query / 8 KV heads of 64, attention sinks and
#   biases, 32 experts top-4 (experts are MXFP4 in the checkpoint: bf16 here), yarn rope
#   (factor 32 over 4096, theta 150000), rms_norm_eps 1e-5, untied.
# - Qwen/Qwen3.5-9B (text_config): vocab 248320, hidden 4096, intermediate 12288, 32 layers,
#   full attention every 4th (16 query / 4 KV heads of 256, output gate, partial rotary 0.25,
#   theta 1e7), the rest Gated DeltaNet (16 key / 32 value heads of 128, conv kernel 4),
#   untied; also transformers' Qwen3_5TextConfig defaults ("Qwen3.5-9B style").
FAMILIES = {
    "qwen3_moe": ("qwen3_moe", "Qwen3-30B-A3B", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1e6), tie_word_embeddings=False)),
    "gpt_oss": ("gpt_oss", "gpt-oss-20b", dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128,
        num_local_experts=32, num_experts_per_tok=4, attention_bias=True, swiglu_limit=7.0,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                             beta_slow=1.0, truncate=False,
                             original_max_position_embeddings=4096))),
    "qwen3_5": ("qwen3_5_text", "Qwen3.5-9B", dict(
        vocab_size=248320, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
        num_attention_heads=16, num_key_value_heads=4, head_dim=256, full_attention_interval=4,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_conv_kernel_dim=4, max_position_embeddings=262144,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25))),
}
# --tiny: the same families at CPU sizes (layer pattern, experts and windows kept in kind).
_TINY_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16)
TINY = {
    "qwen3_moe": dict(_TINY_COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32),
    "gpt_oss": dict(_TINY_COMMON, num_local_experts=8, num_experts_per_tok=2, sliding_window=8),
    "qwen3_5": dict(_TINY_COMMON, full_attention_interval=2, linear_num_key_heads=2, linear_num_value_heads=4,
                    linear_key_head_dim=16, linear_value_head_dim=16),
}
DRAFT_LAYERS = 5  # as z-lab's drafts
BLOCK = 16


def family_config(family: str, tiny: bool, layers: int | None):
    from transformers import AutoConfig

    model_type, _, shape = FAMILIES[family]
    kw = dict(shape, **(TINY[family] if tiny else {}))
    if layers is not None:
        kw["num_hidden_layers"] = layers
    return AutoConfig.for_model(model_type, **kw)


def _build(cfg, device, dtype):
    from transformers import AutoModelForCausalLM

    with torch.device(device):  # built (and initialised) where it runs: no slow CPU init
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def weight_split(model) -> dict:
    """Bytes by kind: 'dense' (read whole per token), 'experts' (routed, [E, ...] tensors),
    'embed' (input table, only when not shared with the LM head)."""
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings().weight
    tied = head is not None and (head.weight is embed or (
        embed.device.type != "meta" and head.weight.data_ptr() == embed.data_ptr()))
    out, seen = {"dense": 0, "experts": 0, "embed": 0}, set()
    for name, p in model.named_parameters():
        key = (p.data_ptr(), p.shape) if p.device.type != "meta" else name
        if key in seen:
            continue
        seen.add(key)
        size = p.numel() * p.element_size()
        if p is embed and not tied:
            out["embed"] += size
        elif ".experts." in name:  # shared experts are named shared_expert(s): dense
            out["experts"] += size
        else:
            out["dense"] += size
    return out


def moe_shape(cfg) -> tuple[int, int]:
    """(experts per layer, experts per token); (0, 0) for a dense family."""
    e = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or 0
    return (int(e), int(getattr(cfg, "num_experts_per_tok", 0) or 0)) if e else (0, 0)


def expected_experts(n_experts: int, k: int, tokens: int) -> float:
    """Expected distinct experts of one layer touched by ``tokens`` tokens, uniform routing."""
    return n_experts * (1 - (1 - k / n_experts) ** tokens)


def read_bytes(split: dict, n_experts: int, k: int, tokens: int) -> float:
    """Weight bytes one forward of ``tokens`` tokens reads (see the module docstring)."""
    if not n_experts:
        return split["dense"] + split["experts"]
    return split["dense"] + split["experts"] * expected_experts(n_experts, k, tokens) / n_experts


def fit_layers(family: str, device, want: int | None, headroom: float = 0.8) -> tuple[int, int]:
    """(layers to build, layers of the real shape): all of them unless the weights would not
    fit in ``headroom`` of the free device memory (counted on the meta device)."""
    full = FAMILIES[family][2]["num_hidden_layers"]
    if want is not None and want > full:
        raise UserError(f"--layers {want}: {family} ({FAMILIES[family][1]}) has {full} layers")
    if want is not None or device.type != "cuda":
        return (want or full), full
    meta = _build(family_config(family, False, None), "meta", torch.bfloat16)
    layers = meta.model.layers
    per_layer = sum(p.numel() for p in layers.parameters()) * 2 / len(layers)
    rest = sum(p.numel() for p in meta.parameters()) * 2 - per_layer * len(layers)
    free = torch.cuda.mem_get_info(device)[0] * headroom
    draft = 4 * DRAFT_LAYERS * per_layer  # generous: fp32 while built
    n = int((free - rest - draft) // per_layer)
    if n < 2:
        raise UserError(f"{family}: not even 2 layers fit in {free / 2**30:.0f} GiB free",
                        "free device memory or pass --layers")
    return min(full, n), full


def build_pair(family: str, device, dtype, tiny: bool, layers: int | None):
    from ..model.draft import rope_setup
    from ..model.toy import make_random_draft

    cfg = family_config(family, tiny, layers)
    torch.manual_seed(0)
    target = _build(cfg, device, dtype)
    target.generation_config.eos_token_id = None
    with torch.device(device):
        draft = make_random_draft(target, block_size=BLOCK, num_layers=DRAFT_LAYERS, dtype=dtype)
    # rope frequencies stay float32 (as the loader keeps them), not rounded through bf16
    draft.inv_freq = rope_setup(draft.config)[0].to(device)
    return target, draft


@torch.inference_mode()
def greedy_identity(target, draft, engine: str, prompt, new_tokens: int) -> dict:
    """Speculative (b=16) against AR (b=1) greedy output of the same engine on one prompt;
    where they differ, the AR top-2 logit gap there (a near-tie in bf16 is rounding)."""
    from ..decoding.loop import SpeculativeDecoder

    dec = SpeculativeDecoder(target, draft, engine=engine)
    ar = dec.generate(prompt, new_tokens, block_size=1).output_ids
    spec = dec.generate(prompt, new_tokens, block_size=BLOCK)
    out = {"identical": ar == spec.output_ids, "tokens": len(ar), "tau": spec.mean_tau,
           "first_divergence": None, "top2_gap_at_divergence": None}
    if not out["identical"]:
        d = next((i for i, (a, b) in enumerate(zip(ar, spec.output_ids)) if a != b),
                 min(len(ar), len(spec.output_ids)))
        ids = torch.cat([prompt.reshape(-1), torch.tensor(ar[:d], device=prompt.device)])[None]
        top = target(input_ids=ids).logits[0, -1].float().topk(2).values
        out.update(first_divergence=d, top2_gap_at_divergence=float(top[0] - top[1]))
    del dec
    return out


def measure_family(family: str, args, device, dtype, bw: float) -> dict:
    from ..engine.select import choose_engine
    from .perf import measure_engine

    t0 = time.time()
    layers, full = fit_layers(family, device, args.layers) if not args.tiny else \
        (args.layers or TINY[family]["num_hidden_layers"], TINY[family]["num_hidden_layers"])
    target, draft = build_pair(family, device, dtype, args.tiny, layers)
    build_s = time.time() - t0
    cfg = target.config
    engine, description = choose_engine("auto", device, target)
    shape = FAMILIES[family][1] + ("" if not args.tiny else " (tiny)")
    print(f"{family}: {shape}, {layers} of {full} layers, built in {build_s:.1f} s", flush=True)
    print(f"engine: {description}", flush=True)
    # the first forward also checks the random init (nothing left uninitialised)
    probe = target(input_ids=torch.zeros(1, 4, dtype=torch.long, device=device)).logits
    if not torch.isfinite(probe).all():
        raise RuntimeError("non-finite logits from the random target")
    split = weight_split(target)
    draft_own = sum(p.numel() * p.element_size() for p in draft.parameters())  # no embed/head
    e, k = moe_shape(cfg)
    head = target.get_output_embeddings().weight
    draft_bytes = draft_own + head.numel() * head.element_size()
    ar_bytes = read_bytes(split, e, k, 1)
    cycle_bytes = read_bytes(split, e, k, BLOCK) + draft_bytes
    r = measure_engine(engine, target, draft, device, [args.context], [BLOCK], args.iters,
                       args.loop_tokens, tau=1.0)
    prompt = torch.randint(0, cfg.vocab_size - 2, (1, args.prompt_len), device=device,
                           generator=torch.Generator(device).manual_seed(1))
    ident = greedy_identity(target, draft, engine, prompt, args.check_tokens)
    ar_ms, loop_ar, cyc = r["ar_step_ms"][args.context], r["cycle_ms"][1], r["cycle_ms"][BLOCK]
    floor_ar, floor_cycle = 1000 * ar_bytes / bw, 1000 * cycle_bytes / bw
    row = {"family": family, "shape": shape, "layers": layers, "layers_full": full,
           "engine": engine, "engine_line": f"engine: {description}", "dtype": str(dtype)[6:],
           "context": args.context, "experts": e, "experts_per_token": k,
           "experts_touched_b16": expected_experts(e, k, BLOCK) if e else None,
           "target_gb": sum(split.values()) / 1e9, "draft_gb": draft_own / 1e9,
           "ar_read_gb": ar_bytes / 1e9, "cycle_read_gb": cycle_bytes / 1e9,
           "copy_tb_s": bw / 1e12, "ar_step_ms": ar_ms, "ar_loop_ms": loop_ar,
           "verify16_ms": r["verify_ms"][BLOCK], "draft16_ms": r["draft_ms"][BLOCK],
           "cycle16_ms": cyc, "c16": cyc / loop_ar, "floor_ar_ms": floor_ar,
           "floor_cycle16_ms": floor_cycle, "floor_share_ar": floor_ar / ar_ms,
           "floor_share_cycle16": floor_cycle / cyc, "greedy_identical": ident["identical"],
           "greedy_tokens": ident["tokens"], "tau": ident["tau"],
           "first_divergence": ident["first_divergence"],
           "top2_gap_at_divergence": ident["top2_gap_at_divergence"],
           "build_s": build_s, "measure_s": time.time() - t0 - build_s}
    del target, draft
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


_COLUMNS = [("family", "family", "{}"), ("layers", "layers", "{}"), ("engine", "engine", "{}"),
            ("AR step ms", "ar_step_ms", "{:.2f}"), ("AR floor ms", "floor_ar_ms", "{:.2f}"),
            ("AR share", "floor_share_ar", "{:.0%}"), ("AR loop ms", "ar_loop_ms", "{:.2f}"),
            ("b16 cycle ms", "cycle16_ms", "{:.2f}"), ("c(16)", "c16", "{:.2f}"),
            ("cycle floor ms", "floor_cycle16_ms", "{:.2f}"),
            ("cycle share", "floor_share_cycle16", "{:.0%}"),
            ("greedy = AR", "greedy_identical", "{}"), ("tau", "tau", "{:.2f}")]


def table(rows: list[dict]) -> str:
    """A Markdown table of the measured rows (failed families: one line each below it)."""
    ok = [r for r in rows if "error" not in r]
    lines = ["| " + " | ".join(h for h, _, _ in _COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for r in ok:
        cells = [f"{r['layers']} of {r['layers_full']}" if key == "layers" else fmt.format(r[key])
                 for _, key, fmt in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"{r['family']}: FAILED: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = CliArgumentParser(prog="python -m dflash.bench.families", description=__doc__.splitlines()[0])
    p.add_argument("--family", default=",".join(FAMILIES),
                   help=f"comma-separated, of {', '.join(FAMILIES)} (default: all)")
    p.add_argument("--layers", type=int, default=None,
                   help="target layers (default: the real count, fewer if it does not fit)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes of the families (CPU, CI)")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    p.add_argument("--context", type=int, default=None, help="context of the timed steps (512)")
    p.add_argument("--iters", type=int, default=None, help="timed repeats per median (20)")
    p.add_argument("--loop-tokens", type=int, default=None, help="tokens per timed loop run (32)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt of the greedy check")
    p.add_argument("--check-tokens", type=int, default=32, help="tokens of the greedy check")
    p.add_argument("--json", default=None, help="write the rows here (a list of records)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="weights (default: bfloat16 on CUDA, float32 on CPU); float32 makes the "
                        "greedy check free of bf16 near-ties (pass --layers to fit)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    families = [f.strip() for f in args.family.split(",") if f.strip()]
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise UserError(f"--family: unknown family '{','.join(bad)}'",
                        f"choose from {', '.join(FAMILIES)}")
    if args.layers is not None and args.layers < 2:
        raise UserError(f"--layers must be >= 2, got {args.layers}")
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("python -m dflash.bench.families needs a CUDA GPU",
                        "run it on a GPU machine, or --tiny (CPU)")
    if device.type == "cpu" and not args.tiny:  # 20-60 GB of float32 weights: not on a CPU
        raise UserError("the real family shapes need a CUDA GPU", "use --tiny on CPU")
    small = args.tiny
    for name, tiny_value, value in (("context", 32, 512), ("iters", 3, 20), ("loop_tokens", 8, 32)):
        if getattr(args, name) is None:
            setattr(args, name, tiny_value if small else value)
    for name in ("context", "iters", "loop_tokens", "prompt_len", "check_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.context < BLOCK:  # the draft step is timed on features of that many positions
        raise UserError(f"--context must be >= {BLOCK}, got {args.context}")
    dtype = getattr(torch, args.dtype) if args.dtype else \
        (torch.bfloat16 if device.type == "cuda" else torch.float32)
    from .common import environment_info
    from .perf import copy_bandwidth

    env = environment_info(device)
    bw = copy_bandwidth(device, 2.0 if device.type == "cuda" else 0.02)
    if device.type == "cuda":  # give the copy buffers back before sizing what fits
        torch.cuda.empty_cache()
    print(f"device {env['gpu_name']}, torch {env['torch_version']}, transformers "
          f"{env['transformers_version']}; copy {bw / 1e12:.3f} TB/s (read+write)", flush=True)
    rows = []
    for family in families:
        try:
            row = measure_family(family, args, device, dtype, bw)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - report this family, go on with the next
            if args.verbose:
                raise
            row = {"family": family, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
            print(f"{family}: FAILED: {row['error']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row.update(device=env["gpu_name"], torch=env["torch_version"],
                   transformers=env["transformers_version"], date=time.strftime("%Y-%m-%d %H:%M"))
        rows.append(row)
        if args.json:  # what is measured survives a later family's failure
            atomic_write_json(Path(args.json), rows)
        if "error" not in row:
            print(f"{family}: AR {row['ar_step_ms']:.2f} ms (floor {row['floor_ar_ms']:.2f}), "
                  f"b16 cycle {row['cycle16_ms']:.2f} ms, c(16) {row['c16']:.2f}, greedy "
                  f"{'identical' if row['greedy_identical'] else 'DIFFERENT'} (tau {row['tau']:.2f})",
                  flush=True)
    print()
    print(table(rows))
    print(f"\nFloor: weight bytes read / copy rate {bw / 1e12:.3f} TB/s; MoE: top-k experts per "
          f"token, b16: E*(1-(1-k/E)^16) distinct experts (uniform routing); input embedding "
          f"table not counted (one row read).")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    run_cli(main)
