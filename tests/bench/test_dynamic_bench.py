"""benchmark_dynamic_schedule.py end to end on a tiny pair (CPU), plus its flag handling."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dflash.bench import dynamic_cli as dynamic_bench
from dflash.errors import UserError

REPO = Path(__file__).resolve().parents[2]
EMBEDDED = (REPO / "models" / "tiny-target" / "config.json").exists() and \
    (REPO / "models" / "tiny-draft" / "config.json").exists()

# The spec's section-4 command, every flag with the spec's value; models and dataset are
# swapped for ones that exist offline, and sizes are cut down.
SPEC_FLAGS = ["--candidate-block-sizes", "8,12,16", "--warmup-cycles", "2", "--ewma-alpha", "0.10",
              "--switch-margin", "0.05", "--required-streak", "2", "--cooldown-cycles", "2",
              "--probe-interval", "12", "--low-accept-threshold", "0.35",
              "--low-accept-streak", "2"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    if EMBEDDED:
        return "embedded", "embedded"
    from dflash.model.toy import save_toy_pair

    target, draft = save_toy_pair(tmp_path_factory.mktemp("dyn_toy"), block_size=8)
    return str(target), str(draft)


def _models(pair):
    return ["--model-name-or-path", pair[0], "--draft-name-or-path", pair[1], "--device", "cpu"]


@pytest.mark.slow
def test_spec_command_runs_with_compare_static(pair, tmp_path):
    jsonl = tmp_path / "dynamic.jsonl"
    cmd = [sys.executable, "benchmark_dynamic_schedule.py", "--dataset", "builtin-math",
           "--max-samples", "2", *_models(pair), "--max-new-tokens", "12", *SPEC_FLAGS,
           "--save-outputs-path", str(jsonl), "--compare-static"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for text in ("baseline (b=1)", "fixed b=8", "fixed b=12", "fixed b=16", "dynamic (ewma)",
                 "block usage (% of cycles)", "switch rate", "dynamic / best fixed"):
        assert text in out, text

    summary = json.loads(jsonl.with_suffix(".summary.json").read_text())
    assert summary["complete"] and summary["samples_done"] == 2
    assert summary["config"]["scheduler"] == {
        "warmup_cycles": 2, "ewma_alpha": 0.10, "switch_margin": 0.05, "required_streak": 2,
        "cooldown_cycles": 2, "probe_interval": 12, "low_accept_threshold": 0.35,
        "low_accept_streak": 2}
    dyn = summary["dynamic"]
    assert set(dyn["block_usage"]) == {"8", "12", "16"}
    assert abs(sum(dyn["block_usage"].values()) - 1.0) < 1e-9
    assert 0.0 <= dyn["switch_rate"] <= 1.0
    # every candidate natively, and below the draft's block size also truncated ("8/16")
    trained = summary["config"]["draft_block_size"]
    assert summary["config"]["truncate_to"] == trained   # truncation mode is the default
    modes = {"8", "12", "16"} | {f"{b}/{trained}" for b in (8, 12, 16) if b < trained}
    assert set(summary["static"]) == modes
    assert summary["best_fixed"] in modes
    assert summary["best_fixed_block_size"] in (8, 12, 16)
    fastest = min(summary["static"].values(), key=lambda m: m["tpot"])
    assert summary["static"][summary["best_fixed"]] is fastest   # best over all fixed runs
    assert summary["dynamic_vs_best_fixed"] > 0 and summary["speedup"] > 0
    assert summary["greedy_match_rate"] == 1.0   # lossless: dynamic greedy == baseline

    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert lines[0]["type"] == "header" and len(lines) == 3
    for rec in lines[1:]:
        (trace,) = rec["trace"]
        n = rec["dynamic"]["cycles"]
        assert len(trace["block_size"]) == len(trace["tau"]) == len(trace["cycle_ms"]) == n
        assert len(trace["reason"]) == n and trace["reason"][0] == "warmup"
        assert set(trace["block_size"]) <= {8, 12, 16}
        assert all(1 <= t <= b for t, b in zip(trace["tau"], trace["block_size"]))
        assert trace["scheduler"]["cycles"] == n
        assert set(rec["static"]) == modes


def test_costmodel_policy_and_resume(pair, tmp_path, capsys):
    jsonl = tmp_path / "cm.jsonl"
    argv = ["--dataset", "builtin-code", "--max-samples", "2", *_models(pair),
            "--max-new-tokens", "8", "--candidate-block-sizes", "4,8", "--policy", "costmodel",
            "--warmup-runs", "0", "--save-outputs-path", str(jsonl)]
    assert dynamic_bench.main(argv) == 0
    first = capsys.readouterr().out
    assert "dynamic (costmodel)" in first
    n_lines = len(jsonl.read_text().splitlines())
    assert n_lines == 3
    summary = json.loads(jsonl.with_suffix(".summary.json").read_text())
    assert summary["config"]["policy"] == "costmodel"
    assert summary["config"]["scheduler"]["switch_margin"] == 0.01  # the policy's own default
    assert summary["config"]["truncate_to"] is not None and not summary["config"]["keep_estimates"]
    # resuming a finished run adds nothing and reports the same samples
    assert dynamic_bench.main(argv + ["--resume"]) == 0
    assert len(jsonl.read_text().splitlines()) == n_lines
    assert json.loads(jsonl.with_suffix(".summary.json").read_text())["samples_done"] == 2
    # without --resume an existing file is refused rather than mixed
    with pytest.raises(UserError, match="already holds results"):
        dynamic_bench.main(argv)


def test_repeats_keep_each_modes_median_run(pair, tmp_path, monkeypatch):
    """--repeats 3: every mode runs three times per prompt in rotated order; each keeps the
    run with the median TPOT (here the runs are made to take 3, 1 and 2 ms per token)."""
    calls = []
    real = dynamic_bench._generate_turns

    def counted(*a, **k):
        results, texts, traces = real(*a, **k)
        calls.append(k.get("block_size") or "dyn")
        for r in results:  # fake decode times, per mode: 3x, 1x, 2x in its successive runs
            r.total_s = r.ttft_s + [3, 1, 2][sum(c == calls[-1] for c in calls) - 1] * 1e-3 * \
                max(1, len(r.output_ids) - 1)
        return results, texts, traces

    monkeypatch.setattr(dynamic_bench, "_generate_turns", counted)
    out = tmp_path / "rep.json"
    argv = ["--dataset", "builtin-code", "--max-samples", "1", *_models(pair),
            "--max-new-tokens", "8", "--candidate-block-sizes", "4,8", "--warmup-runs", "0",
            "--repeats", "3", "--output-json", str(out)]
    assert dynamic_bench.main(argv) == 0
    assert calls[:2] == [1, "dyn"] and calls[2:4] == ["dyn", 1]  # rotated order
    assert len(calls) == 6
    summary = json.loads(out.read_text())
    assert summary["config"]["repeats"] == 3
    assert abs(summary["baseline"]["tpot"] - 2e-3) < 1e-9  # the median of 3, 1 and 2 ms


def test_native_mode_and_kept_estimates(pair, tmp_path, capsys):
    out = tmp_path / "native.json"
    argv = ["--dataset", "builtin-code", "--max-samples", "2", *_models(pair),
            "--max-new-tokens", "8", "--candidate-block-sizes", "4,8", "--warmup-runs", "0",
            "--draft-block-size", "0", "--keep-estimates", "--compare-static",
            "--output-json", str(out)]
    assert dynamic_bench.main(argv) == 0
    assert "draft mode: native" in capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert summary["config"]["truncate_to"] is None and summary["config"]["keep_estimates"]
    # native mode still compares against the truncated fixed runs (the bar is the best of all)
    trained = summary["config"]["draft_block_size"]
    assert set(summary["static"]) == {"4", "8"} | {f"{b}/{trained}" for b in (4, 8)
                                                   if b < trained}
    assert summary["greedy_match_rate"] == 1.0


@pytest.mark.parametrize("flags, message", [
    (["--ewma-alpha", "0"], "--ewma-alpha must be in (0, 1]"),
    (["--ewma-alpha", "1.5"], "--ewma-alpha"),
    (["--candidate-block-sizes", "1,8"], "must be >= 2"),
    (["--candidate-block-sizes", ""], "empty"),
    (["--candidate-block-sizes", "8,x"], "must be integers"),
    (["--warmup-cycles", "0"], "--warmup-cycles"),
    (["--required-streak", "0"], "--required-streak"),
    (["--cooldown-cycles", "-1"], "--cooldown-cycles"),
    (["--probe-interval", "-2"], "--probe-interval"),
    (["--switch-margin", "-0.1"], "--switch-margin"),
    (["--low-accept-threshold", "2"], "--low-accept-threshold"),
    (["--low-accept-streak", "0"], "--low-accept-streak"),
    (["--policy", "costmodel", "--switch-margin", "-1"], "--switch-margin"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--warmup-runs", "-1"], "--warmup-runs"),
    (["--draft-block-size", "1"], "--draft-block-size"),
    (["--draft-block-size", "-4"], "--draft-block-size"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_flags_fail_before_loading_models(flags, message):
    args = dynamic_bench.build_parser().parse_args(["--dataset", "builtin-math", *flags])
    with pytest.raises(UserError) as err:
        dynamic_bench.check_args(args)
    assert message in err.value.one_line()


def test_defaults_are_the_specs():
    args = dynamic_bench.build_parser().parse_args([])
    assert args.dataset == "aime25" and args.max_new_tokens == 2048
    assert args.candidate_block_sizes == "8,12,16" and args.policy == "ewma"
    assert dynamic_bench.scheduler_kwargs(args) == {
        "warmup_cycles": 2, "ewma_alpha": 0.10, "switch_margin": 0.05, "required_streak": 2,
        "cooldown_cycles": 2, "probe_interval": 12, "low_accept_threshold": 0.35,
        "low_accept_streak": 2}


def test_cli_error_is_one_line(capsys):
    from dflash.errors import run_cli

    with pytest.raises(SystemExit) as exit_:
        run_cli(dynamic_bench.main, ["--dataset", "nope"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "unknown dataset 'nope'" in err
