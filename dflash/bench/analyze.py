"""Correlate acceptance with speedup over block-size sweeps and propose a first threshold policy.

    python -m dflash.analyze logs/sweep_*  [--out-dir logs/analysis]

Reads ``summary.csv`` of each sweep folder (written by run_block_sweep.sh; a bench_* folder of
run_benchmark.sh or a CSV file works too), keeps the rows that ran (status ok/partial) with a
block size > 1, and computes, per category (math = reasoning, code, chat) and overall:

* Pearson and Spearman correlation (with two-sided p-values) of tau vs speedup and of
  tau/block_size vs speedup;
* for each step between neighbouring block sizes of a sweep (s -> b): did b beat s, and at
  which acceptance ratio tau_b/b. The proposed threshold of b is the smallest tau_b/b at which
  b still beat s, reported with the largest ratio at which it lost, whether that cleanly
  separates the data, and how many steps the rule "take b when tau/b >= threshold" gets right.

Writes ``analysis.md`` (also printed), ``analysis.json`` and ``analysis_scatter.png``.
"""
from __future__ import annotations

import argparse
import glob
import math
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import UserError, run_cli
from .report import save_figure

GOOD_STATUS = ("ok", "partial")


# ----------------------------------------------------------------------------- statistics
def rankdata(values) -> np.ndarray:
    """Ranks 1..n, ties get the average of the ranks they span."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def pearson(x, y) -> float | None:
    """Pearson's r; None with fewer than 3 points or a constant variable."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError("x and y differ in length")
    if len(x) < 3:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    scale = max(1.0, float(np.abs(x).max()) ** 2, float(np.abs(y).max()) ** 2)
    if sxx <= 1e-24 * scale * len(x) or syy <= 1e-24 * scale * len(x):
        return None
    r = float(dx @ dy) / math.sqrt(sxx * syy)
    return max(-1.0, min(1.0, r))


def spearman(x, y) -> float | None:
    """Spearman's rho: Pearson's r of the (average-tie) ranks."""
    if len(x) < 3:
        return None
    return pearson(rankdata(x), rankdata(y))


def p_value(r: float | None, n: int) -> float | None:
    """Two-sided p-value of a correlation of n points under H0 (t-distribution, n-2 dof)."""
    if r is None or n < 3:
        return None
    if abs(r) >= 1.0:
        return 0.0
    t = r * math.sqrt((n - 2) / (1.0 - r * r))
    try:
        from scipy.stats import t as student_t
    except ImportError:  # pragma: no cover - scipy is a requirement
        return None
    return float(2.0 * student_t.sf(abs(t), n - 2))


def correlate(x, y) -> dict:
    n = len(x)
    r, rho = pearson(x, y), spearman(x, y)
    return {"n": n, "pearson": r, "pearson_p": p_value(r, n),
            "spearman": rho, "spearman_p": p_value(rho, n)}


# ----------------------------------------------------------------------------- data
def find_inputs(args: list[str]) -> list[Path]:
    """summary.csv files of the given folders / files (globs expanded here too)."""
    paths: list[Path] = []
    for arg in args:
        matches = sorted(glob.glob(arg)) or [arg]
        for m in matches:
            p = Path(m)
            if p.is_dir():
                if (p / "summary.csv").exists():
                    paths.append(p / "summary.csv")
                else:
                    print(f"note: {p} has no summary.csv; skipped", file=sys.stderr)
            elif p.is_file():
                paths.append(p)
            else:
                raise UserError(f"{arg}: no such sweep folder or CSV file",
                                "give folders written by run_block_sweep.sh, e.g. logs/sweep_*")
    if not paths:
        raise UserError("no summary.csv found in the given folders",
                        "run run_block_sweep.sh first (it writes logs/sweep_<tag>/summary.csv)")
    return paths


def load_rows(paths: list[Path]):
    """One DataFrame of every usable row, with columns sweep, category, tau_per_block."""
    import pandas as pd

    frames = []
    for path in paths:
        try:
            df = pd.read_csv(path)
        except Exception as err:  # noqa: BLE001 - any unreadable CSV is a user problem
            raise UserError(f"cannot read {path}: {type(err).__name__}: {err}") from err
        missing = {"dataset", "block_size", "speedup", "tau"} - set(df.columns)
        if missing:
            raise UserError(f"{path} lacks column(s) {', '.join(sorted(missing))}",
                            "is it a summary.csv of run_block_sweep.sh?")
        df = df.copy()
        df["sweep"] = path.parent.name if path.name == "summary.csv" else path.stem
        df["source_csv"] = str(path)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    total = len(df)
    if "status" in df.columns:
        df = df[df["status"].fillna("ok").isin(GOOD_STATUS)]
    for col in ("block_size", "speedup", "tau"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df = df.dropna(subset=["block_size", "speedup", "tau"])
    df = df[df["block_size"] > 1].copy()
    df["block_size"] = df["block_size"].astype(int)
    skipped = total - len(df)
    df["tau_per_block"] = df["tau"] / df["block_size"]
    if "category" not in df.columns:
        df["category"] = None
    df["category"] = [c if isinstance(c, str) and c else _category(d)
                      for c, d in zip(df["category"], df["dataset"])]
    # one sweep folder may hold several datasets (a bench_* folder): group by both
    df["group"] = df["sweep"].astype(str) + "/" + df["dataset"].astype(str)
    df = df.sort_values(["group", "block_size"]).reset_index(drop=True)
    return df, skipped


def _category(dataset: str) -> str:
    try:
        from ..datasets import category_of
        return category_of(str(dataset))
    except (UserError, ImportError):
        return "other"


# ----------------------------------------------------------------------------- policy
def step_observations(df) -> list[dict]:
    """For each sweep, each neighbouring pair of block sizes s < b: did b beat s?"""
    obs = []
    for group, part in df.groupby("group", sort=True):
        part = part.sort_values("block_size")
        rows = part.to_dict("records")
        for small, large in zip(rows, rows[1:]):
            if small["block_size"] == large["block_size"]:
                continue
            obs.append({"group": group, "dataset": large["dataset"], "category": large["category"],
                        "small": int(small["block_size"]), "large": int(large["block_size"]),
                        "ratio": float(large["tau_per_block"]), "tau_large": float(large["tau"]),
                        "tau_small": float(small["tau"]),
                        "speedup_small": float(small["speedup"]),
                        "speedup_large": float(large["speedup"]),
                        "wins": bool(large["speedup"] > small["speedup"])})
    return obs


def thresholds(obs: list[dict]) -> list[dict]:
    """Per step s -> b: the smallest tau_b/b at which b beat s, and how well that rule fits."""
    steps = sorted({(o["small"], o["large"]) for o in obs}, key=lambda p: (p[1], p[0]))
    out = []
    for small, large in steps:
        mine = [o for o in obs if (o["small"], o["large"]) == (small, large)]
        wins = [o["ratio"] for o in mine if o["wins"]]
        losses = [o["ratio"] for o in mine if not o["wins"]]
        theta = min(wins) if wins else None
        max_loss = max(losses) if losses else None
        if theta is None:
            correct = len(losses)
        else:
            correct = sum((o["ratio"] >= theta) == o["wins"] for o in mine)
        out.append({"step": f"{small}->{large}", "small": small, "large": large,
                    "threshold": theta, "observations": len(mine), "wins": len(wins),
                    "losses": len(losses), "max_losing_ratio": max_loss,
                    "separable": theta is not None and (max_loss is None or theta > max_loss),
                    "accuracy": correct / len(mine) if mine else None})
    return out


# ----------------------------------------------------------------------------- analysis
def analyze(df) -> dict:
    groups = {"overall": df}
    for cat in sorted(df["category"].dropna().unique()):
        groups[cat] = df[df["category"] == cat]
    correlations = {}
    for name, part in groups.items():
        correlations[name] = {
            "tau_vs_speedup": correlate(part["tau"].to_numpy(), part["speedup"].to_numpy()),
            "tau_per_block_vs_speedup": correlate(part["tau_per_block"].to_numpy(),
                                                  part["speedup"].to_numpy()),
        }
    obs = step_observations(df)
    policy = {"overall": thresholds(obs)}
    for cat in groups:
        if cat != "overall":
            policy[cat] = thresholds([o for o in obs if o["category"] == cat])
    best = []
    for group, part in df.groupby("group", sort=True):
        top = part.loc[part["speedup"].idxmax()]
        best.append({"group": group, "dataset": top["dataset"], "category": top["category"],
                     "best_block_size": int(top["block_size"]), "speedup": float(top["speedup"]),
                     "tau": float(top["tau"]), "tau_per_block": float(top["tau_per_block"])})
    hardware = sorted({str(g) for g in df["gpu_name"].dropna().unique()}) if "gpu_name" in df \
        else []
    return {"points": int(len(df)), "sweeps": sorted(df["group"].unique().tolist()),
            "block_sizes": sorted(int(b) for b in df["block_size"].unique()),
            "hardware": hardware, "correlations": correlations, "best_per_sweep": best,
            "step_observations": obs, "policy": policy}


def _f(value, spec=".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)


def _corr_cell(c: dict, key: str) -> str:
    if c[key] is None:
        return "-"
    return f"{c[key]:+.3f} (p={_f(c[key + '_p'], '.3g')})"


def policy_text(steps: list[dict]) -> list[str]:
    """The scheduler rule these thresholds imply, in words."""
    if not steps:
        return ["No neighbouring block sizes with results: no policy."]
    lines = []
    caps = [s for s in steps if s["threshold"] is None]
    for s in steps:
        if s["threshold"] is None:
            lines.append(f"- **{s['large']}**: never beat {s['small']} in this data "
                         f"({s['losses']} of {s['observations']} steps): stay at {s['small']} "
                         f"(cap).")
        else:
            lines.append(
                f"- **{s['large']}**: run at block size {s['large']} while the running mean of "
                f"tau/{s['large']} stays >= **{s['threshold']:.3f}**; below it drop back to "
                f"{s['small']}. From {s['small']}, try {s['large']} when tau/{s['small']} "
                f">= {s['threshold']:.3f} (optimistic: tau/b shrinks as b grows, the drop rule "
                f"corrects it).")
    if caps:
        lines.append("- Caps take precedence: never go above a size that never won its step.")
    return lines


def render_markdown(result: dict, inputs: list[str], skipped: int) -> str:
    out = ["# DFlash block-size sweep analysis", ""]
    out.append(f"{result['points']} sweep points (block size > 1, status ok) from "
               f"{len(result['sweeps'])} sweep(s): {', '.join(result['sweeps'])}; "
               f"{skipped} row(s) skipped (failed, baseline-only or incomplete).")
    out.append(f"Block sizes: {', '.join(map(str, result['block_sizes']))}. "
               f"Hardware: {', '.join(result['hardware']) or 'unknown'}. "
               f"Inputs: {', '.join(inputs)}.")
    out += ["", "## Correlation with speedup", "",
            "r = Pearson, rho = Spearman (average ranks for ties); two-sided p-values from the "
            "t-distribution with n-2 degrees of freedom. '-' = fewer than 3 points or a constant "
            "variable.", "",
            "| group | n | tau: r | tau: rho | tau/b: r | tau/b: rho |", "|---|---|---|---|---|---|"]
    for name, c in result["correlations"].items():
        t, tb = c["tau_vs_speedup"], c["tau_per_block_vs_speedup"]
        out.append(f"| {name} | {t['n']} | {_corr_cell(t, 'pearson')} | {_corr_cell(t, 'spearman')}"
                   f" | {_corr_cell(tb, 'pearson')} | {_corr_cell(tb, 'spearman')} |")
    out += ["", "## Best block size per sweep", "",
            "| sweep | category | best block size | speedup | tau | tau/b |", "|---|---|---|---|---|---|"]
    for b in result["best_per_sweep"]:
        out.append(f"| {b['group']} | {b['category']} | {b['best_block_size']} | "
                   f"{b['speedup']:.3f} | {b['tau']:.3f} | {b['tau_per_block']:.3f} |")
    out += ["", "## Proposed first threshold policy", "",
            "For each step s -> b between neighbouring block sizes of a sweep, b *wins* when its "
            "speedup beats s. The threshold of b is the smallest tau_b/b at which b still won; "
            "'max losing' is the largest tau_b/b at which it lost (separable = threshold above "
            "every losing ratio); accuracy = share of steps that the rule "
            "\"b wins iff tau_b/b >= threshold\" gets right."]
    for name, steps in result["policy"].items():
        out += ["", f"### {name}", "",
                "| step | threshold tau/b | wins / steps | max losing tau/b | separable | accuracy |",
                "|---|---|---|---|---|---|"]
        for s in steps:
            out.append(f"| {s['step']} | {_f(s['threshold'])} | {s['wins']} / {s['observations']}"
                       f" | {_f(s['max_losing_ratio'])} | {'yes' if s['separable'] else 'no'} | "
                       f"{_f(s['accuracy'], '.2f')} |")
        if name == "overall":
            out += ["", "Scheduler rule (overall thresholds):", ""] + policy_text(steps)
    out += ["", "Caveat: thresholds come from few points per step; rerun the sweeps with more "
            "samples (and on the target GPU) before trusting them. Timings from different "
            "hardware are not comparable."]
    return "\n".join(out) + "\n"


def scatter_plot(df, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"math": "tab:red", "code": "tab:blue", "chat": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, col, label in ((axes[0], "tau", "tau (mean acceptance length)"),
                           (axes[1], "tau_per_block", "tau / block size")):
        for cat, part in df.groupby("category", sort=True):
            ax.scatter(part[col], part["speedup"], color=colors.get(cat, "tab:gray"),
                       label="math (reasoning)" if cat == "math" else cat, alpha=0.8)
            for x, y, b in zip(part[col], part["speedup"], part["block_size"]):
                ax.annotate(str(b), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_xlabel(label)
        ax.set_ylabel("speedup (TPOT)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle("speedup vs acceptance (numbers = block size)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _clean(obj):
    """JSON-safe: numpy scalars to Python, NaN to None."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dflash.analyze",
        description="Correlate tau and tau/block_size with speedup over block-size sweeps and "
                    "propose a first threshold policy for the block-size scheduler.")
    p.add_argument("sweeps", nargs="+", help="sweep folders (logs/sweep_*) or summary CSV files")
    p.add_argument("--out-dir", default="logs/analysis",
                   help="where analysis.md, analysis.json and analysis_scatter.png go "
                        "(default logs/analysis)")
    p.add_argument("--no-plot", action="store_true", help="skip the scatter plot")
    p.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    return p


def main(argv=None) -> int:
    from ..runlog import atomic_write_json, atomic_write_text

    args = build_parser().parse_args(argv)
    inputs = find_inputs(args.sweeps)
    df, skipped = load_rows(inputs)
    if df.empty:
        raise UserError("no usable rows (status ok, block size > 1) in the given sweeps",
                        "check the sweeps' summary.csv: did every block size fail?")
    result = analyze(df)
    result["inputs"] = [str(p) for p in inputs]
    result["skipped_rows"] = skipped
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out = Path(args.out_dir)
    md = render_markdown(result, [str(p) for p in inputs], skipped)
    atomic_write_text(out / "analysis.md", md)
    atomic_write_json(out / "analysis.json", _clean(result))
    if not args.no_plot:
        scatter_plot(df, out / "analysis_scatter.png")
    print(md)
    print(f"written: {out / 'analysis.md'}, {out / 'analysis.json'}"
          + ("" if args.no_plot else f", {out / 'analysis_scatter.png'}"))
    return 0


if __name__ == "__main__":
    sys.argv[0] = "dflash.analyze"
    run_cli(main)
