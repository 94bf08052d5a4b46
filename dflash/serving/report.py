"""Metrics and reports of the serving benchmark: per-configuration summaries (SGLang's
bench_serving field names), the Markdown and JSON reports and the throughput plot, each
written atomically (readers never see half a report)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

from ..runlog import atomic_write_bytes
from .cli import MODE_LABEL, MODES, Paths
from .client import LoadRun
from .store import ResultStore

# ----------------------------------------------------------------------------- metrics

def percentile(values: Sequence[float], q: float) -> float | None:
    s = sorted(values)
    if not s:
        return None
    k = (len(s) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000.0


def summarize(run: LoadRun, mode: str, engine: str = "sglang",
              counters: dict | None = None) -> tuple[dict, list[str]]:
    """Metrics of one configuration (sglang.bench_serving field names), and warnings.
    SGLang's acceptance comes per request (meta_info); other engines' from ``counters``
    (:func:`.prometheus.acceptance_delta` over the timed run)."""
    res = run.results
    n = len(res)
    out_tokens = sum(r.completion_tokens for r in res)
    lat = [r.latency for r in res]
    m = {"completed": n, "duration": run.duration, "max_inflight": run.max_inflight,
         "total_input_tokens": sum(r.prompt_tokens for r in res),
         "total_output_tokens": out_tokens,
         "output_throughput": out_tokens / run.duration if run.duration > 0 else None,
         "request_throughput": n / run.duration if run.duration > 0 else None,
         "mean_e2e_latency_ms": _ms(sum(lat) / n) if n else None,
         "median_e2e_latency_ms": _ms(percentile(lat, 0.5)),
         "p99_e2e_latency_ms": _ms(percentile(lat, 0.99))}
    ttft = [r.ttft for r in res if r.ttft is not None]
    tpot = [(r.latency - r.ttft) / (r.completion_tokens - 1) for r in res
            if r.ttft is not None and r.completion_tokens > 1]
    for name, vals in (("ttft", ttft), ("tpot", tpot)):
        m[f"mean_{name}_ms"] = _ms(sum(vals) / len(vals)) if vals else None
        m[f"median_{name}_ms"] = _ms(percentile(vals, 0.5))
        m[f"p99_{name}_ms"] = _ms(percentile(vals, 0.99))
    acc = [r.accept_length for r in res if r.accept_length is not None]
    m["accept_length"] = sum(acc) / len(acc) if acc else None
    m["accept_length_n"] = len(acc)
    sources = sorted({r.accept_source for r in res if r.accept_source})
    m["accept_length_source"] = ",".join(sources) or None
    verified = [r for r in res if r.verify_ct]
    m["accept_length_token_weighted"] = (
        sum(r.completion_tokens for r in verified) / sum(r.verify_ct for r in verified)
        if verified else None)
    acc_d = [r for r in res if r.accepted_drafts is not None and r.proposed_drafts]
    m["draft_accept_rate"] = (sum(r.accepted_drafts for r in acc_d)
                              / sum(r.proposed_drafts for r in acc_d)) if acc_d else None
    warnings = []
    if engine != "sglang":
        m.update(accept_length=None, accept_length_n=0, accept_length_source=None,
                 accept_rate_per_position=None, spec_counters_delta=counters)
        if counters:
            m.update(accept_length=counters["accept_length"], accept_length_n=n,
                     accept_length_source="/metrics spec_decode counter deltas",
                     draft_accept_rate=counters.get("draft_accept_rate"),
                     accept_rate_per_position=counters.get("accept_rate_per_position"))
        elif mode == "dflash" and n:
            known = "vllm:spec_decode_num_drafts / _num_accepted_tokens"
            warnings.append(f"the server's /metrics has no speculative-decoding counters this "
                            f"client knows ({known}); acceptance length reported as n/a")
        return m, warnings
    if mode == "dflash" and n and not acc:
        warnings.append("the server sent no spec_accept_length (nor spec_verify_ct) in "
                        "meta_info; acceptance length reported as n/a")
    return m, warnings


# ----------------------------------------------------------------------------- reports

def _fmt(value, spec: str = ".1f", missing: str = "n/a") -> str:
    if value is None:
        return missing
    return format(value, spec)


ENGINE_TITLE = {"sglang": "SGLang", "vllm": "vLLM", "openai": "OpenAI-compatible server"}
ACCEPT_NOTE = {"sglang": "per-request mean of `meta_info.spec_accept_length`",
               "vllm": "1 + accepted / drafts of the `/metrics` counters over the timed run",
               "openai": "1 + accepted / drafts of the `/metrics` counters over the timed run"}


class Reporter:
    """Sections per (engine, attention backend); a run whose log holds several engines'
    results names the engine in each section and gets an engine column."""

    def __init__(self, args: argparse.Namespace, paths: Paths, store: ResultStore,
                 settings: dict):
        self.args, self.paths, self.store, self.settings = args, paths, store, settings
        self.warnings: list[str] = []
        self.engine = getattr(args, "engine", "sglang")

    def engines(self) -> list[str]:
        names = [self.engine] + sorted({k[3] for k in self.store.results} - {self.engine})
        present = [e for e in names if any(k[3] == e for k in self.store.results)]
        return present or [self.engine]

    def groups(self) -> list[tuple[str, str]]:
        """(engine, backend) pairs, in run order."""
        out = []
        for e in self.engines():
            names = list(self.settings.get("attention_backends_run", [])) \
                if e == self.engine else []
            for (b, _, _, ee) in self.store.results:
                if ee == e and b not in names:
                    names.append(b)
            have = [b for b in names if any(k[0] == b and k[3] == e for k in self.store.results)]
            out += [(e, b) for b in (have or names)]
        return out

    def _name(self, engine: str, backend: str) -> str:
        return backend if len(self.engines()) == 1 else f"{engine} {backend}"

    def concurrencies(self, backend: str, engine: str | None = None) -> list[int]:
        engine = engine or self.engine
        cs = set(self.args.concurrency_list) if engine == self.engine else set()
        cs |= {c for (b, _, c, e) in self.store.results if b == backend and e == engine}
        return sorted(cs)

    def summary(self) -> dict:
        out = {}
        for e, b in self.groups():
            per = {}
            for c in self.concurrencies(b, e):
                base = self.store.results.get((b, "baseline", c, e))
                spec = self.store.results.get((b, "dflash", c, e))
                bt = base.get("output_throughput") if base else None
                dt = spec.get("output_throughput") if spec else None
                per[str(c)] = {"baseline_output_throughput": bt, "dflash_output_throughput": dt,
                               "speedup": dt / bt if bt and dt else None,
                               "accept_length": spec.get("accept_length") if spec else None,
                               "baseline_measured": base is not None,
                               "dflash_measured": spec is not None}
            out[self._name(e, b)] = per
        return out

    def to_json(self, status: str, error: str | None) -> dict:
        order = {e: i for i, e in enumerate(self.engines())}
        return {"status": status, "error": error, "engine": self.engine,
                "engines": self.engines(), "settings": self.settings,
                "identity": self.store.identity,
                "results": [self.store.results[k] for k in sorted(
                    self.store.results, key=lambda k: (order.get(k[3], 9), k[0],
                                                       MODES.index(k[1])
                                                       if k[1] in MODES else 9, k[2]))],
                "summary": self.summary(), "warnings": self.warnings,
                "files": {"markdown": str(self.paths.md), "json": str(self.paths.json),
                          "results_jsonl": str(self.paths.jsonl), "plot": str(self.paths.png)}}

    def to_markdown(self, status: str, error: str | None, plot_ok: bool) -> str:
        s = self.settings
        engines = self.engines()
        multi = len(engines) > 1
        title = "Serving" if multi else ENGINE_TITLE.get(engines[0], engines[0])
        lines = [f"# {title} DFlash throughput benchmark", ""]
        if multi:
            lines += ["Engines compared: " + ", ".join(ENGINE_TITLE.get(e, e) for e in engines)
                      + f" (settings below are those of the last run, {self.engine}).", ""]
        if status != "complete":
            lines += [f"**Status: {status}.** {error or ''} Configurations measured so far are "
                      f"below; rerun with `--resume` to continue.", ""]
        lines += ["## Settings", "", "| setting | value |", "|---|---|"]
        for key, value in s.items():
            if key == "launch_commands":
                continue
            if isinstance(value, (list, tuple)):
                value = ", ".join(str(v) for v in value)
            lines.append(f"| {key} | {str(value).replace('|', '/')} |")
        lines.append("")
        summary = self.summary()
        for e, b in self.groups():
            per = summary[self._name(e, b)]
            cs = list(per)
            head = (f"## {ENGINE_TITLE.get(e, e)}, attention backend: {b}" if multi
                    else f"## Attention backend: {b}")
            lines += [head, "",
                      "| metric | " + " | ".join(f"c={c}" for c in cs) + " |",
                      "|---|" + "---:|" * len(cs)]

            def row(name, key, spec, suffix=""):
                cells = []
                for c in cs:
                    cell = per[c]
                    measured = cell["baseline_measured"] if key.startswith("baseline") else \
                        cell["dflash_measured"]
                    if key == "speedup":
                        measured = cell["baseline_measured"] and cell["dflash_measured"]
                    value = cell[key]
                    cells.append("not run" if not measured else
                                 (_fmt(value, spec) + suffix if value is not None else "n/a"))
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            row("baseline tok/s", "baseline_output_throughput", ".1f")
            row("DFLASH tok/s", "dflash_output_throughput", ".1f")
            row("speedup", "speedup", ".2f", "x")
            row("acceptance length", "accept_length", ".2f")
            lines.append("")
            lines += self._details(e, b, multi)
        if plot_ok:
            lines += ["## Throughput vs concurrency", "",
                      f"![output throughput vs concurrency]({self.paths.png.name})", ""]
        if self.warnings:
            lines += ["## Warnings", ""] + [f"- {w}" for w in self.warnings] + [""]
        lines += [f"Raw records: `{self.paths.jsonl}`; JSON report: `{self.paths.json}`.", ""]
        return "\n".join(lines)

    def _details(self, e: str, b: str, multi: bool) -> list[str]:
        eng_head, eng_rule = ("engine | ", "---|") if multi else ("", "")
        lines = [f"Details (latencies in ms; acceptance length = {ACCEPT_NOTE.get(e, '')}):", "",
                 f"| {eng_head}mode | c | requests | output tokens | duration s | tok/s | req/s | "
                 "mean lat | p50 lat | p99 lat | mean TTFT | p99 TTFT | mean TPOT | "
                 f"acceptance |", f"|{eng_rule}---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
                 "---:|---:|---:|---:|"]
        for mode in MODES:
            for c in self.concurrencies(b, e):
                r = self.store.results.get((b, mode, c, e))
                if not r:
                    continue
                eng = f"{e} | " if multi else ""
                lines.append(
                    f"| {eng}{MODE_LABEL[mode]} | {c} | {r['completed']} | "
                    f"{r['total_output_tokens']} | {_fmt(r['duration'], '.2f')} | "
                    f"{_fmt(r['output_throughput'])} | {_fmt(r['request_throughput'], '.2f')}"
                    f" | {_fmt(r['mean_e2e_latency_ms'], '.0f')} | "
                    f"{_fmt(r['median_e2e_latency_ms'], '.0f')} | "
                    f"{_fmt(r['p99_e2e_latency_ms'], '.0f')} | "
                    f"{_fmt(r.get('mean_ttft_ms'), '.0f')} | "
                    f"{_fmt(r.get('p99_ttft_ms'), '.0f')} | "
                    f"{_fmt(r.get('mean_tpot_ms'), '.1f')} | "
                    f"{_fmt(r.get('accept_length'), '.2f', '-' if mode == 'baseline' else 'n/a')} |")
        lines.append("")
        per_pos = [(c, r["accept_rate_per_position"]) for c in self.concurrencies(b, e)
                   for r in [self.store.results.get((b, "dflash", c, e))]
                   if r and r.get("accept_rate_per_position")]
        if per_pos:  # from vLLM's per-position counter: P(draft token k accepted) per draft
            lines += ["Acceptance rate per draft position (accepted at position k / drafts):",
                      ""] + [f"- c={c}: " + ", ".join(f"{v:.2f}" for v in rates)
                             for c, rates in per_pos] + [""]
        return lines

    def write_plot(self) -> bool:
        if not self.store.results:
            return False
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception as err:  # noqa: BLE001
            self.warn(f"no plot: matplotlib is not available ({type(err).__name__})")
            return False
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs: set[int] = set()
        for k, (e, b) in enumerate(self.groups()):
            for mode, style in (("baseline", "--"), ("dflash", "-")):
                pts = sorted((c, r["output_throughput"]) for (bb, mm, c, ee), r in
                             self.store.results.items()
                             if bb == b and ee == e and mm == mode and r.get("output_throughput"))
                if pts:
                    xs.update(p[0] for p in pts)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                            color=f"C{k}", label=f"{self._name(e, b)} {MODE_LABEL[mode]}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(xs), [str(x) for x in sorted(xs)])
        ax.minorticks_off()
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"{self.args.target_model or 'server'} on {self.args.dataset_name}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        import io
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(self.paths.png, buf.getvalue())
        return True

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)

    def write(self, status: str, error: str | None = None, plot: bool = False) -> None:
        plot_ok = self.write_plot() if plot else self.paths.png.exists()
        atomic_write_bytes(self.paths.json,
                           (json.dumps(self.to_json(status, error), indent=2) + "\n").encode())
        atomic_write_bytes(self.paths.md, self.to_markdown(status, error, plot_ok).encode())


