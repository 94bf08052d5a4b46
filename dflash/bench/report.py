"""The wrappers' combined summary: ``summary.csv``, ``summary.md``, ``launch.json`` and, for a
sweep, ``sweep_plot.png``, built from the summary JSON each benchmark.py run wrote (never from
its log). The plot helpers are shared with the sweep analysis (``dflash.bench.analyze``).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
from pathlib import Path

from ..errors import UserError

# summary.csv columns: the documented ones first, in this order; more follow.
CSV_COLUMNS = [
    "dataset", "max_samples", "block_size", "speedup", "tau",
    "gpu_name", "cuda_version", "torch_version",
    "baseline_total_wall_s", "speculative_total_wall_s",
    "baseline_tokens_per_sec", "speculative_tokens_per_sec",
    "baseline_tpot", "speculative_tpot", "baseline_ttft", "speculative_ttft",
    "acceptance_histogram", "log_path", "output_jsonl_path",
    "status", "error", "category", "tau_per_block", "wall_speedup", "samples_done",
    "samples_failed", "greedy_match_rate", "max_new_tokens", "temperature", "world_size",
    "model", "draft", "baseline_source", "baseline_log_path", "json_path", "dataset_source",
    "returncode", "elapsed_s", "run_tag",
]
REQUIRED_COLUMNS = CSV_COLUMNS[:CSV_COLUMNS.index("output_jsonl_path") + 1]

def _display(path: Path, cwd: Path) -> str:
    """A path as the commands show it: relative to the working directory when inside it."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(cwd))
    except ValueError:
        return str(path)


def failed(run) -> bool:
    return run.status in ("failed", "interrupted")


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure atomically (a reader never sees half a PNG) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _num(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return None


def _category(dataset: str) -> str | None:
    try:
        from ..datasets import category_of
        return category_of(dataset)
    except (UserError, ImportError):
        return None


def summary_row(run, plan) -> dict:
    """One summary.csv row from benchmark.py's JSON (and the shared baseline's, if any)."""
    s = run.summary or {}
    cfg = s.get("config", {})
    env = s.get("environment", {})
    shared = run.baseline.summary if run.baseline is not None else None
    if run.role == "baseline" or cfg.get("block_size") == 1:
        base = s.get("baseline")
        spec = base       # block size 1 *is* autoregressive decoding: speedup 1 by definition
        speed = 1.0 if base else None
        wall = 1.0 if base else None
        base_source = "same run"
    elif run.baseline is not None:
        base = (shared or {}).get("baseline")
        spec = s.get("speculative")
        speed = (base["tpot"] / spec["tpot"]) if base and spec and spec.get("tpot") else None
        wall = (base["total_wall_s"] / spec["total_wall_s"]) if base and spec and \
            spec.get("total_wall_s") else None
        base_source = "shared baseline"
    else:
        base, spec = s.get("baseline"), s.get("speculative")
        speed, wall = s.get("speedup"), s.get("wall_speedup")
        base_source = "same run" if base else None
    block = cfg.get("block_size", 1 if run.role == "baseline" else run.block_size)
    tau = spec.get("tau") if spec else None
    if not env and shared:
        env = shared.get("environment", {})

    def pick(mode, key):
        return _num(mode.get(key)) if mode else None

    row = {
        "dataset": run.dataset, "max_samples": run.max_samples, "block_size": block,
        "speedup": _num(speed), "tau": _num(tau),
        "gpu_name": env.get("gpu_name"), "cuda_version": env.get("cuda_version"),
        "torch_version": env.get("torch_version"),
        "baseline_total_wall_s": pick(base, "total_wall_s"),
        "speculative_total_wall_s": pick(spec, "total_wall_s"),
        "baseline_tokens_per_sec": pick(base, "tokens_per_sec"),
        "speculative_tokens_per_sec": pick(spec, "tokens_per_sec"),
        "baseline_tpot": pick(base, "tpot"), "speculative_tpot": pick(spec, "tpot"),
        "baseline_ttft": pick(base, "ttft"), "speculative_ttft": pick(spec, "ttft"),
        "acceptance_histogram": json.dumps(spec["acceptance_histogram"]) if spec and
        spec.get("acceptance_histogram") is not None else None,
        "log_path": _display(run.log_path, plan.cwd),
        "output_jsonl_path": _display(run.jsonl_path, plan.cwd),
        "status": run.status, "error": run.error, "category": _category(run.dataset),
        "tau_per_block": (tau / block) if _num(tau) is not None and isinstance(block, int)
        and block > 0 else None,
        "wall_speedup": _num(wall), "samples_done": s.get("samples_done"),
        "samples_failed": s.get("samples_failed"),
        "greedy_match_rate": _num(s.get("greedy_match_rate")),
        "max_new_tokens": cfg.get("max_new_tokens", plan.settings.get("max_new_tokens")),
        "temperature": cfg.get("temperature", plan.settings.get("temperature")),
        "world_size": s.get("world_size"),
        "model": cfg.get("model", plan.settings.get("model")),
        "draft": cfg.get("draft", plan.settings.get("draft")),
        "baseline_source": base_source,
        "baseline_log_path": _display(run.baseline.log_path, plan.cwd) if run.baseline else
        (_display(run.log_path, plan.cwd) if base else None),
        "json_path": _display(run.json_path, plan.cwd),
        "dataset_source": s.get("dataset_source"),
        "returncode": run.returncode,
        "elapsed_s": round(run.elapsed_s, 3) if run.elapsed_s is not None else None,
        "run_tag": plan.run_tag,
    }
    return row


def summary_rows(plan) -> list[dict]:
    """Rows for every run that ran: each block size; a shared baseline only when it failed."""
    rows = []
    for run in plan.runs:
        if run.status == "not run":
            continue
        if run.role == "baseline" and not failed(run):
            continue
        rows.append(summary_row(run, plan))
    return rows


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def rows_to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in CSV_COLUMNS])
    return buf.getvalue()


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if _num(value) is None else format(value * scale, spec)


def summary_table(rows: list[dict]) -> str:
    """The combined Markdown table printed at the end."""
    head = ["dataset", "block", "status", "samples", "base TPOT ms", "spec TPOT ms", "speedup",
            "tau", "tau/b", "spec tok/s", "log"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["dataset"]), str(r["block_size"] if r["block_size"] is not None else "draft"),
                 r["status"] + (f" ({r['error']})" if r.get("error") else ""),
                 str(r["samples_done"] if r.get("samples_done") is not None else "-"),
                 _fmt(r["baseline_tpot"], ".2f", 1000), _fmt(r["speculative_tpot"], ".2f", 1000),
                 _fmt(r["speedup"], ".2f") + ("x" if _num(r["speedup"]) is not None else ""),
                 _fmt(r["tau"], ".2f"), _fmt(r["tau_per_block"], ".3f"),
                 _fmt(r["speculative_tokens_per_sec"], ".1f"), str(r["log_path"])]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def _pair_name(model, draft) -> str:
    """'embedded' + 'embedded' -> the folders it stands for."""
    if model == draft == "embedded":
        return "embedded pair: models/tiny-target + models/tiny-draft"
    return f"{model} + {draft}"


def sweep_plot(rows: list[dict], path: Path) -> bool:
    """speedup and tau against block size (one sweep). False when there is nothing to plot."""
    good = sorted((r for r in rows if r["status"] in ("ok", "partial") and
                   _num(r["speedup"]) is not None and isinstance(r["block_size"], int)),
                  key=lambda r: r["block_size"])
    if not good:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["block_size"] for r in good]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot(xs, [r["speedup"] for r in good], "o-", color="tab:blue", label="speedup (TPOT)")
    ax.axhline(1.0, color="tab:blue", lw=0.8, ls=":")
    ax.set_xlabel("block size")
    ax.set_ylabel("speedup over autoregressive (x)", color="tab:blue")
    ax.set_xticks(xs)
    ax2 = ax.twinx()
    ax2.plot(xs, [r["tau"] for r in good], "s--", color="tab:orange", label="tau")
    ax2.set_ylabel("mean acceptance length tau", color="tab:orange")
    ax2.set_ylim(0, 1.05 * max(max(xs), max(r["tau"] for r in good)))  # tau <= block size
    first = good[0]
    failed_sizes = [str(r["block_size"]) for r in rows if r["status"] in ("failed", "interrupted")
                    and r["block_size"] != 1]
    title = (f"{first['dataset']} ({first['samples_done']} samples, {first['max_new_tokens']} "
             f"tokens, T={first['temperature']}) on {first['gpu_name']}\n"
             f"{_pair_name(first['model'], first['draft'])}"
             + (" (shared baseline)" if first["baseline_source"] == "shared baseline" else ""))
    if failed_sizes:
        title += f"\nfailed: block size {', '.join(failed_sizes)}"
    ax.set_title(title, fontsize=9)
    lines = ax.get_lines()[:1] + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="best", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def write_summaries(plan) -> list[dict]:
    from ..runlog import atomic_write_json, atomic_write_text

    rows = summary_rows(plan)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.out_dir / "summary.csv", rows_to_csv(rows))
    table = summary_table(rows)
    header = (f"# {plan.kind} {plan.run_tag}\n\n" + "\n".join(
        f"- {k}: {v}" for k, v in plan.settings.items()) + "\n\n")
    atomic_write_text(plan.out_dir / "summary.md", header + table + "\n")
    atomic_write_json(plan.out_dir / "launch.json", {
        "settings": plan.settings,
        "runs": [{"name": r.name, "role": r.role, "command": shlex.join(r.cmd),
                  "status": r.status, "returncode": r.returncode, "elapsed_s": r.elapsed_s,
                  "log_path": _display(r.log_path, plan.cwd),
                  "json_path": _display(r.json_path, plan.cwd)} for r in plan.runs]})
    if plan.kind == "sweep":
        sweep_plot(rows, plan.out_dir / "sweep_plot.png")
    return rows
