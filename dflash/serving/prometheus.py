"""Acceptance from a server's Prometheus counters (``GET /metrics``), as deltas over one
configuration: vLLM reports speculative decoding only there.

    vllm:spec_decode_num_drafts_total                     verify steps with a draft
    vllm:spec_decode_num_draft_tokens_total               draft tokens proposed
    vllm:spec_decode_num_accepted_tokens_total            draft tokens accepted
    vllm:spec_decode_num_accepted_tokens_per_pos_total{position="k"}

mean acceptance length = 1 + accepted / drafts (the bonus token included), acceptance rate at
position k = accepted_k / drafts. Samples are summed over every other label (engine,
model_name...); ``_created`` samples (a counter's creation time) are not values.
"""
from __future__ import annotations

import math
import re

COUNTERS = {  # our name -> metric family (without the _total suffix)
    "drafts": "spec_decode_num_drafts",
    "draft_tokens": "spec_decode_num_draft_tokens",
    "accepted": "spec_decode_num_accepted_tokens",
}
PER_POSITION = "spec_decode_num_accepted_tokens_per_pos"
KNOWN_PREFIXES = ("vllm:",)
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(\S+)(\s+\S+)?$")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample in Prometheus text format; comments and lines
    that are not samples are skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        out.append((m.group(1), labels, value))
    return out


def _family(name: str, prefix: str, family: str) -> bool:
    return name in (f"{prefix}{family}_total", f"{prefix}{family}")


def spec_counters(text: str | None) -> dict | None:
    """Totals of the known speculative-decoding counters, or None when the text has none
    (no /metrics, or a server / mode without speculation)."""
    if not text:
        return None
    found: dict = {}
    per_pos: dict[int, float] = {}
    for name, labels, value in parse(text):
        if name.endswith("_created") or not math.isfinite(value):
            continue
        for prefix in KNOWN_PREFIXES:
            if not name.startswith(prefix):
                continue
            for key, family in COUNTERS.items():
                if _family(name, prefix, family):
                    found[key] = found.get(key, 0.0) + value
            if _family(name, prefix, PER_POSITION):
                try:
                    pos = int(labels.get("position", ""))
                except ValueError:
                    continue
                per_pos[pos] = per_pos.get(pos, 0.0) + value
    if "drafts" not in found or "accepted" not in found:
        return None
    found["per_position"] = per_pos
    return found


def acceptance_delta(before: dict | None, after: dict | None) -> dict | None:
    """Acceptance over the interval between two :func:`spec_counters` readings (None when
    either is missing or nothing was drafted in between)."""
    if not before or not after:
        return None
    d_drafts = after["drafts"] - before["drafts"]
    d_acc = after["accepted"] - before["accepted"]
    if d_drafts <= 0:
        return None
    out = {"drafts": d_drafts, "accepted_tokens": d_acc,
           "accept_length": 1.0 + d_acc / d_drafts}
    if "draft_tokens" in after and "draft_tokens" in before:
        d_tok = after["draft_tokens"] - before["draft_tokens"]
        out["draft_tokens"] = d_tok
        out["draft_accept_rate"] = d_acc / d_tok if d_tok > 0 else None
    positions = sorted(after["per_position"])
    out["accept_rate_per_position"] = [
        (after["per_position"][k] - before["per_position"].get(k, 0.0)) / d_drafts
        for k in positions] if positions else None
    return out
