"""Per-sample measurements and their summary (TPOT, TTFT, wall time, tokens/s, tau, histogram)."""
from __future__ import annotations

import statistics

from ..decoding.result import GenerationResult


def measure(results: list[GenerationResult], max_block: int = 1) -> dict:
    """One sample's record for one mode (several results for multi-turn prompts)."""
    hist = [0] * max(max_block, max((c.tau for r in results for c in r.cycles), default=1))
    for r in results:
        for c in r.cycles:
            hist[c.tau - 1] += 1
    cycles = sum(len(r.cycles) for r in results)
    rec = {
        "tokens": sum(r.num_tokens for r in results),
        "turns": len(results),
        "ttft_s": sum(r.ttft_s for r in results),
        "decode_s": sum(r.decode_s for r in results),
        "total_s": sum(r.total_s for r in results),
        "cycles": cycles,
        "tau": sum(c.tau for r in results for c in r.cycles) / cycles if cycles else 0.0,
        "acceptance_histogram": hist,
        "block_sizes": sorted({c.block_size for r in results for c in r.cycles}),
    }
    rec["tpot_s"] = rec["decode_s"] / max(1, rec["tokens"] - rec["turns"])
    drafts = [c.draft_s for r in results for c in r.cycles if c.draft_s is not None]
    if drafts:
        rec["draft_s"] = sum(drafts)
        rec["verify_s"] = sum(c.verify_s for r in results for c in r.cycles)
    return rec


def summarize(records: list[dict]) -> dict | None:
    """Aggregate one mode over samples. TPOT = decode time / tokens after each turn's first."""
    records = [r for r in records if r]
    if not records:
        return None
    tokens = sum(r["tokens"] for r in records)
    turns = sum(r["turns"] for r in records)
    decode = sum(r["decode_s"] for r in records)
    wall = sum(r["total_s"] for r in records)
    cycles = sum(r["cycles"] for r in records)
    width = max(len(r["acceptance_histogram"]) for r in records)
    hist = [0] * width
    for r in records:
        for i, n in enumerate(r["acceptance_histogram"]):
            hist[i] += n
    out = {
        "samples": len(records),
        "tokens": tokens,
        "tpot": decode / max(1, tokens - turns),
        "ttft": sum(r["ttft_s"] for r in records) / turns,
        "total_wall_s": wall,
        "tokens_per_sec": tokens / wall if wall > 0 else 0.0,
        "tau": sum(h * (i + 1) for i, h in enumerate(hist)) / cycles if cycles else 0.0,
        "acceptance_histogram": hist,
        "cycles": cycles,
        "median_sample_tpot": statistics.median(r["tpot_s"] for r in records),
    }
    if any("draft_s" in r for r in records):
        out["draft_ms_per_cycle"] = 1000 * sum(r.get("draft_s", 0) for r in records) / max(1, cycles)
        out["verify_ms_per_cycle"] = 1000 * sum(r.get("verify_s", 0) for r in records) / max(1, cycles)
    return out


def speedup(baseline: dict | None, spec: dict | None) -> float | None:
    if not baseline or not spec or spec["tpot"] <= 0:
        return None
    return baseline["tpot"] / spec["tpot"]


def format_histogram(hist: list[int]) -> str:
    total = sum(hist) or 1
    return " ".join(f"{i + 1}:{100 * n / total:.0f}%" for i, n in enumerate(hist) if n)
