"""run_benchmark.sh / run_block_sweep.sh (logic in dflash/launch.py).

The env-var -> command mapping is checked in-process (build_plan, no torch start-up); each
wrapper's DRY_RUN is checked as a real subprocess; the end-to-end runs use a tiny pair on CPU
(the embedded pair when it exists, else the random toy pair) with tiny sizes.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess

import pytest

from conftest import EMBEDDED, REPO
from dflash.bench import launch
from dflash.errors import UserError

WRAPPER_VARS = set(launch.BENCHMARK_VARS) | set(launch.SWEEP_VARS) | {"DATASET", "MAX_SAMPLES"}
PY = ".venv/bin/python" if (REPO / ".venv" / "bin" / "python").exists() else "python3"
TORCHRUN = ".venv/bin/torchrun" if (REPO / ".venv" / "bin" / "torchrun").exists() else "torchrun"


# ----------------------------------------------------------------------------- helpers
def plan(kind="benchmark", cuda=(False, 0), **env):
    env = {k: str(v) for k, v in env.items()}
    env.setdefault("RUN_TAG", "t")
    return launch.build_plan(kind, env, cwd=REPO, cuda=cuda)


def cmds(kind="benchmark", cuda=(False, 0), **env) -> list[list[str]]:
    return [r.cmd for r in plan(kind, cuda, **env).runs]


def value(cmd: list[str], flag: str):
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


@pytest.fixture(scope="module")
def pair_env(request):
    """MODEL/DRAFT of a tiny pair: the embedded one when present, else the toy pair."""
    if EMBEDDED:
        return {"MODEL": "embedded", "DRAFT": "embedded"}
    target, draft = request.getfixturevalue("toy_pair")
    return {"MODEL": str(target), "DRAFT": str(draft)}


def wrapper(script: str, env: dict, timeout=240) -> subprocess.CompletedProcess:
    """Run a wrapper from the repo root with only the given wrapper variables set."""
    full = {k: v for k, v in os.environ.items() if k not in WRAPPER_VARS}
    full.update({k: str(v) for k, v in env.items()})
    full.update(PYTHONUNBUFFERED="1", QUIET=env.get("QUIET", "1"))
    return subprocess.run(["bash", script], cwd=REPO, env=full, text=True, capture_output=True,
                          timeout=timeout)


def read_csv(path):
    import pandas as pd
    return pd.read_csv(path)


def is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- env -> commands
def test_fast_and_full_defaults():
    fast = cmds(FAST=1, NPROC=1)
    assert [(value(c, "--dataset"), value(c, "--max-samples")) for c in fast] == \
        [("aime25", "8"), ("gsm8k", "8"), ("humaneval", "8")]
    assert {value(c, "--max-new-tokens") for c in fast} == {"256"}
    full = cmds(NPROC=1)
    assert [f"{value(c, '--dataset')}:{value(c, '--max-samples')}" for c in full] == \
        launch.FULL_TASKS.split()
    assert {value(c, "--max-new-tokens") for c in full} == {"2048"}
    assert all("--block-size" not in c for c in fast + full)  # the draft's own block size


def test_cpu_defaults_embedded_pair_offline_fallback_one_process():
    p = plan(FAST=1)
    c = p.runs[0].cmd
    assert c[:2] == [PY, "benchmark.py"]
    assert value(c, "--model-name-or-path") == "embedded"
    assert value(c, "--draft-name-or-path") == "embedded"
    assert "--offline-fallback" in c
    assert sum("embedded tiny pair" in n for n in p.notes) == 1


def test_cuda_defaults_hub_pair_all_gpus():
    p = plan(FAST=1, cuda=(True, 4))
    c = p.runs[0].cmd
    assert c[:4] == [TORCHRUN, "--nproc_per_node=4", "--master_port=29600", "benchmark.py"]
    assert value(c, "--model-name-or-path") == "Qwen/Qwen3-4B"
    assert value(c, "--draft-name-or-path") == "z-lab/Qwen3-4B-DFlash-b16"
    assert "--offline-fallback" not in c and not p.notes
    with pytest.raises(UserError, match="NPROC=8 but only 4"):
        plan(NPROC=8, cuda=(True, 4))


def test_each_variable_changes_the_command(tmp_path):
    base = dict(FAST=1, NPROC=1, TASKS="aime25:4", MODEL="m", DRAFT="d")
    c = cmds(**base)[0]
    assert value(c, "--max-samples") == "4" and value(c, "--temperature") == "0.0"
    assert cmds(**{**base, "TASKS": "mt-bench"})[0].count("--max-samples") == 0
    assert value(cmds(**{**base, "MAX_NEW_TOKENS": 128})[0], "--max-new-tokens") == "128"
    c = cmds(**{**base, "MODEL": "a/b", "DRAFT": "c/d"})[0]
    assert (value(c, "--model-name-or-path"), value(c, "--draft-name-or-path")) == ("a/b", "c/d")
    assert value(cmds(**{**base, "TEMPERATURE": "0.7"})[0], "--temperature") == "0.7"
    assert value(cmds(**{**base, "BLOCK_SIZE": 8})[0], "--block-size") == "8"
    many = cmds(**{**base, "BLOCK_SIZES": "4 8,16"})
    assert [value(c, "--block-size") for c in many] == ["4", "8", "16"]
    two = cmds(**{**base, "NPROC": 2, "BLOCK_SIZES": "4 8", "MASTER_PORT_BASE": 30100})
    assert [c[:4] for c in two] == [[TORCHRUN, "--nproc_per_node=2", f"--master_port={p}",
                                     "benchmark.py"] for p in (30100, 30101)]
    skip = cmds(**{**base, "BLOCK_SIZES": "4 8", "SKIP_BASELINE": 1})
    assert [value(c, "--block-size") for c in skip] == ["1", "4", "8"]
    assert ["--skip-baseline" in c for c in skip] == [False, True, True]
    logs = tmp_path / "L"
    c = cmds(**{**base, "LOG_DIR": logs, "RUN_TAG": "abc", "BLOCK_SIZE": 8})[0]
    assert value(c, "--output-json") == str(logs / "bench_abc" / "aime25_b8.json")
    assert value(c, "--save-outputs-path") == str(logs / "bench_abc" / "aime25_b8.jsonl")
    c = cmds(**{**base, "LOG_DIR": logs, "SAVE_OUTPUTS_DIR": tmp_path / "O"})[0]
    assert value(c, "--save-outputs-path") == str(tmp_path / "O" / "aime25.jsonl")
    assert value(c, "--output-json") == str(logs / "bench_t" / "aime25.json")
    assert "--continue-on-error" in cmds(**base)[0]
    assert "--continue-on-error" not in cmds(**{**base, "CONTINUE_ON_ERROR": 0})[0]
    assert "--resume" not in cmds(**base)[0] and "--resume" in cmds(**{**base, "RESUME": 1})[0]
    assert "--offline-fallback" not in cmds(**{**base, "OFFLINE_FALLBACK": 0})[0]
    assert cmds(**{**base, "EXTRA_ARGS": "--engine hf --warmup-runs 0"})[0][-4:] == \
        ["--engine", "hf", "--warmup-runs", "0"]
    assert plan(**{**base, "DRY_RUN": 1}).dry_run and not plan(**base).dry_run
    # relative LOG_DIR / default LOG_DIR show as paths relative to the repo root
    assert value(cmds(**base)[0], "--output-json") == "logs/bench_t/aime25.json"


def test_sweep_variables():
    c = cmds("sweep", NPROC=1, MODEL="m", DRAFT="d")
    assert [value(x, "--block-size") for x in c] == ["4", "8", "12", "16"]
    assert {(value(x, "--dataset"), value(x, "--max-samples"), value(x, "--max-new-tokens"))
            for x in c} == {("aime25", "8", "256")}
    p = plan("sweep", NPROC=1, MODEL="m", DRAFT="d", DATASET="mt-bench", MAX_SAMPLES=3,
             MAX_NEW_TOKENS=64, BLOCK_SIZES="8 12", RUN_TAG="x", TEMPERATURE=1)
    assert p.out_dir == REPO / "logs" / "sweep_x"
    assert [value(r.cmd, "--block-size") for r in p.runs] == ["8", "12"]
    assert {value(r.cmd, "--dataset") for r in p.runs} == {"mt-bench"}
    assert {value(r.cmd, "--max-samples") for r in p.runs} == {"3"}
    assert {value(r.cmd, "--temperature") for r in p.runs} == {"1.0"}
    tag = plan("sweep", NPROC=1, MODEL="m", DRAFT="d", DATASET="humaneval", RUN_TAG="").run_tag
    assert tag.startswith("humaneval_")


@pytest.mark.parametrize("kind,env,message", [
    ("benchmark", {"TASKS": "nosuch:3"}, "unknown dataset"),
    ("benchmark", {"TASKS": "aime25:0"}, "max_samples >= 1"),
    ("benchmark", {"TASKS": "aime25:x"}, "dataset:max_samples"),
    ("benchmark", {"BLOCK_SIZE": "8", "BLOCK_SIZES": "4 8"}, "not both"),
    ("benchmark", {"BLOCK_SIZES": "4 eight"}, "BLOCK_SIZES must be integers"),
    ("benchmark", {"NPROC": "0"}, "must be >= 1"),
    ("benchmark", {"CONTINUE_ON_ERROR": "maybe"}, "yes/no"),
    ("benchmark", {"RUN_TAG": "a/b"}, "RUN_TAG"),
    ("benchmark", {"TEMPERATURE": "-1"}, ">= 0"),
    ("sweep", {"TASKS": "aime25:4"}, "DATASET"),
    ("sweep", {"SKIP_BASELINE": "1", "BLOCK_SIZES": "1"}, "nothing to compare"),
])
def test_bad_settings_are_one_line_errors(kind, env, message):
    with pytest.raises(UserError, match=message):
        plan(kind, **{"NPROC": 1, "MODEL": "m", "DRAFT": "d", **env})


def test_dry_run_prints_exact_commands_and_runs_nothing(tmp_path, pair_env):
    env = {**pair_env, "DRY_RUN": 1, "NPROC": 1, "LOG_DIR": tmp_path, "RUN_TAG": "dry",
           "OFFLINE_FALLBACK": 1}
    out = tmp_path / "sweep_dry"
    sweep = wrapper("run_block_sweep.sh", {**env, "DATASET": "humaneval", "MAX_SAMPLES": 2,
                                           "MAX_NEW_TOKENS": 32, "BLOCK_SIZES": "4 8",
                                           "SKIP_BASELINE": 1})
    assert sweep.returncode == 0, sweep.stderr
    expected = []
    for block, extra in (("1", []), ("4", ["--skip-baseline"]), ("8", ["--skip-baseline"])):
        name = "humaneval_baseline" if block == "1" else f"humaneval_b{block}"
        expected.append(shlex.join(
            [PY, "benchmark.py", "--dataset", "humaneval", "--max-samples", "2",
             "--model-name-or-path", pair_env["MODEL"], "--draft-name-or-path", pair_env["DRAFT"],
             "--max-new-tokens", "32", "--temperature", "0.0", "--block-size", block, *extra,
             "--save-outputs-path", str(out / f"{name}.jsonl"), "--output-json",
             str(out / f"{name}.json"), "--offline-fallback", "--continue-on-error"]))
    assert sweep.stdout.splitlines() == expected
    bench = wrapper("run_benchmark.sh", {**env, "TASKS": "aime25:4 humaneval:2",
                                         "MAX_NEW_TOKENS": 128, "NPROC": 2,
                                         "MASTER_PORT_BASE": 29900, "CONTINUE_ON_ERROR": 0})
    assert bench.returncode == 0, bench.stderr
    lines = bench.stdout.splitlines()
    assert len(lines) == 2
    for i, (line, (ds, n)) in enumerate(zip(lines, [("aime25", 4), ("humaneval", 2)])):
        assert line == shlex.join(
            [TORCHRUN, "--nproc_per_node=2", f"--master_port={29900 + i}", "benchmark.py",
             "--dataset", ds, "--max-samples", str(n), "--model-name-or-path", pair_env["MODEL"],
             "--draft-name-or-path", pair_env["DRAFT"], "--max-new-tokens", "128",
             "--temperature", "0.0", "--save-outputs-path", str(tmp_path / "bench_dry" / f"{ds}.jsonl"),
             "--output-json", str(tmp_path / "bench_dry" / f"{ds}.json"), "--offline-fallback"])
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing was written


def test_rerun_without_resume_is_refused(tmp_path, monkeypatch):
    for k in WRAPPER_VARS:
        monkeypatch.delenv(k, raising=False)
    env = dict(NPROC="1", MODEL="m", DRAFT="d", LOG_DIR=str(tmp_path), RUN_TAG="r",
               DATASET="humaneval", BLOCK_SIZES="4")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "sweep_r").mkdir()
    (tmp_path / "sweep_r" / "humaneval_b4.jsonl").write_text('{"type": "header"}\n')
    with pytest.raises(UserError, match="already holds results") as err:
        launch.main(["sweep"])
    assert "RESUME=1" in err.value.hint


# ----------------------------------------------------------------------------- real CPU runs
@pytest.mark.slow
def test_sweep_on_cpu_fills_every_column(tmp_path, pair_env):
    r = wrapper("run_block_sweep.sh", {**pair_env, "DATASET": "humaneval", "MAX_SAMPLES": 2,
                                       "MAX_NEW_TOKENS": 32, "BLOCK_SIZES": "4 8", "NPROC": 1,
                                       "LOG_DIR": tmp_path, "RUN_TAG": "cpu"})
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "sweep_cpu"
    df = read_csv(out / "summary.csv")
    assert list(df.columns[:len(launch.REQUIRED_COLUMNS)]) == launch.REQUIRED_COLUMNS
    assert list(df["block_size"]) == [4, 8] and list(df["status"]) == ["ok", "ok"]
    assert not df[launch.REQUIRED_COLUMNS].isna().any().any()
    numeric = ["max_samples", "block_size", "speedup", "tau", "baseline_total_wall_s",
               "speculative_total_wall_s", "baseline_tokens_per_sec", "speculative_tokens_per_sec",
               "baseline_tpot", "speculative_tpot", "baseline_ttft", "speculative_ttft"]
    for col in numeric:
        assert df[col].dtype.kind in "if", col
        assert (df[col] > 0).all(), col
    assert set(df["gpu_name"]) == {"cpu"} and set(df["cuda_version"]) == {"none"}
    for _, row in df.iterrows():
        b = row["block_size"]
        hist = json.loads(row["acceptance_histogram"])
        assert len(hist) == b and all(isinstance(n, int) for n in hist)
        assert row["speedup"] == pytest.approx(row["baseline_tpot"] / row["speculative_tpot"])
        assert 1 <= row["tau"] <= b
        log = REPO / row["log_path"] if not os.path.isabs(row["log_path"]) else row["log_path"]
        assert os.path.samefile(log, out / f"humaneval_b{b}.log")
        assert "DFlash benchmark: humaneval" in (out / f"humaneval_b{b}.log").read_text()
        assert os.path.samefile(row["output_jsonl_path"], out / f"humaneval_b{b}.jsonl")
        summary = json.loads((out / f"humaneval_b{b}.json").read_text())
        assert summary["speculative"]["tau"] == pytest.approx(row["tau"])
    assert is_png(out / "sweep_plot.png")
    assert "| humaneval | 8 | ok |" in r.stdout


@pytest.mark.slow
def test_sweep_shared_baseline_and_a_failing_block_size(tmp_path, pair_env):
    """SKIP_BASELINE=1: one baseline pass; block size 0 (rejected by benchmark.py) fails alone."""
    r = wrapper("run_block_sweep.sh", {**pair_env, "DATASET": "humaneval", "MAX_SAMPLES": 2,
                                       "MAX_NEW_TOKENS": 16, "BLOCK_SIZES": "4 0 8", "NPROC": 1,
                                       "SKIP_BASELINE": 1, "EXTRA_ARGS": "--warmup-runs 0", "LOG_DIR": tmp_path, "RUN_TAG": "s"})
    out = tmp_path / "sweep_s"
    assert r.returncode == 2, r.stdout + r.stderr  # the failed run's exit status, at the end
    logs = sorted(p.name for p in out.glob("*.log"))
    assert logs == ["humaneval_b0.log", "humaneval_b4.log", "humaneval_b8.log",
                    "humaneval_baseline.log"]
    base = json.loads((out / "humaneval_baseline.json").read_text())
    assert base["config"]["block_size"] == 1 and base["speculative"] is None
    df = read_csv(out / "summary.csv")
    assert list(df["block_size"]) == [4, 0, 8]
    assert list(df["status"]) == ["ok", "failed", "ok"]
    failed = df[df["status"] == "failed"].iloc[0]
    assert "--block-size must be >= 1" in failed["error"]
    assert failed["log_path"].endswith("humaneval_b0.log") and failed["speedup"] != failed["speedup"]
    good = df[df["status"] == "ok"]
    assert not good[launch.REQUIRED_COLUMNS].isna().any().any()
    for _, row in good.iterrows():
        spec = json.loads((out / f"humaneval_b{row['block_size']}.json").read_text())
        assert spec["baseline"] is None and spec["config"]["skip_baseline"] is True
        assert row["baseline_tpot"] == pytest.approx(base["baseline"]["tpot"])
        assert row["speedup"] == pytest.approx(base["baseline"]["tpot"] / spec["speculative"]["tpot"])
        assert row["baseline_source"] == "shared baseline"
        assert row["baseline_log_path"].endswith("humaneval_baseline.log")
    assert "--skip-baseline" in (out / "humaneval_b4.log").read_text().splitlines()[0]
    assert is_png(out / "sweep_plot.png")


@pytest.mark.slow
def test_benchmark_continue_on_error(tmp_path, pair_env):
    """Block size 0 makes every run fail fast (before any model loads)."""
    env = {**pair_env, "TASKS": "humaneval:1 builtin-code:1", "BLOCK_SIZE": 0, "NPROC": 1,
           "MAX_NEW_TOKENS": 8, "LOG_DIR": tmp_path}
    stop = wrapper("run_benchmark.sh", {**env, "RUN_TAG": "stop", "CONTINUE_ON_ERROR": 0})
    assert stop.returncode == 2, stop.stdout + stop.stderr
    assert sorted(p.name for p in (tmp_path / "bench_stop").glob("*.log")) == ["humaneval_b0.log"]
    assert "CONTINUE_ON_ERROR=0: stopping" in stop.stderr
    assert list(read_csv(tmp_path / "bench_stop" / "summary.csv")["status"]) == ["failed"]
    go_on = wrapper("run_benchmark.sh", {**env, "RUN_TAG": "go"})
    assert go_on.returncode == 2
    assert sorted(p.name for p in (tmp_path / "bench_go").glob("*.log")) == \
        ["builtin-code_b0.log", "humaneval_b0.log"]
    assert list(read_csv(tmp_path / "bench_go" / "summary.csv")["status"]) == ["failed", "failed"]


@pytest.mark.slow
def test_two_processes_on_cpu_both_wrappers(tmp_path, pair_env):
    env = {**pair_env, "NPROC": 2, "MAX_NEW_TOKENS": 8, "LOG_DIR": tmp_path,
           "EXTRA_ARGS": "--warmup-runs 0"}
    bench = wrapper("run_benchmark.sh", {**env, "TASKS": "humaneval:2", "BLOCK_SIZE": 4,
                                         "RUN_TAG": "p2", "MASTER_PORT_BASE": 29810})
    assert bench.returncode == 0, bench.stdout + bench.stderr
    log = (tmp_path / "bench_p2" / "humaneval_b4.log").read_text()
    assert "--nproc_per_node=2" in log.splitlines()[0]
    df = read_csv(tmp_path / "bench_p2" / "summary.csv")
    assert list(df["world_size"]) == [2] and list(df["samples_done"]) == [2]
    assert df.loc[0, "speedup"] > 0
    sweep = wrapper("run_block_sweep.sh", {**env, "DATASET": "humaneval", "MAX_SAMPLES": 2,
                                           "BLOCK_SIZES": "4", "RUN_TAG": "p2",
                                           "MASTER_PORT_BASE": 29820})
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    df = read_csv(tmp_path / "sweep_p2" / "summary.csv")
    assert list(df["world_size"]) == [2] and list(df["status"]) == ["ok"]
    assert not df[launch.REQUIRED_COLUMNS].isna().any().any()
    assert is_png(tmp_path / "sweep_p2" / "sweep_plot.png")


# ----------------------------------------------------------------------------- summary rows
def _summary(block, base_tpot=0.02, spec_tpot=0.01, skip_baseline=False):
    mode = lambda tpot, tau, width: {"tpot": tpot, "ttft": 0.1, "total_wall_s": 2.0,  # noqa: E731
                                     "tokens_per_sec": 50.0, "tau": tau,
                                     "acceptance_histogram": [1] * width}
    base = None if skip_baseline else mode(base_tpot, 1.0, 1)
    spec = None if block == 1 else mode(spec_tpot, 3.0, block)
    return {"config": {"block_size": block, "max_new_tokens": 8, "temperature": 0.0,
                       "model": "m", "draft": "d"},
            "complete": True, "samples_done": 2, "samples_failed": 0, "world_size": 1,
            "baseline": base, "speculative": spec,
            "speedup": base_tpot / spec_tpot if base and spec else None,
            "wall_speedup": 1.0 if base and spec else None, "greedy_match_rate": None,
            "environment": {"gpu_name": "cpu", "cuda_version": "none", "torch_version": "x"},
            "dataset_source": "built-in"}


def test_summary_rows_shared_baseline_block_one_and_failures():
    p = plan("sweep", NPROC=1, MODEL="m", DRAFT="d", DATASET="builtin-chat", BLOCK_SIZES="4 8",
             SKIP_BASELINE=1)
    shared, b4, b8 = p.runs
    shared.summary, shared.status, shared.returncode = _summary(1), "ok", 0
    b4.summary, b4.status, b4.returncode = _summary(4, spec_tpot=0.005, skip_baseline=True), "ok", 0
    b8.status, b8.returncode, b8.error = "failed", 1, "benchmark.py: error: boom"
    rows = launch.summary_rows(p)
    assert [r["block_size"] for r in rows] == [4, 8]            # an ok shared baseline: no row
    assert rows[0]["speedup"] == pytest.approx(0.02 / 0.005)
    assert rows[0]["baseline_source"] == "shared baseline" and rows[0]["tau_per_block"] == 0.75
    assert rows[1]["status"] == "failed" and rows[1]["speedup"] is None
    shared.status, shared.summary = "failed", None                 # failed shared baseline
    rows = launch.summary_rows(p)
    assert [(r["block_size"], r["status"]) for r in rows] == [(1, "failed"), (4, "ok"), (8, "failed")]
    assert rows[1]["speedup"] is None and rows[1]["tau"] == 3.0
    csv_text = launch.rows_to_csv(rows)
    assert csv_text.splitlines()[0].split(",")[:len(launch.REQUIRED_COLUMNS)] == \
        launch.REQUIRED_COLUMNS
    # --block-size 1 as a sweep point is the baseline itself: speedup 1, tau 1
    q = plan("sweep", NPROC=1, MODEL="m", DRAFT="d", DATASET="builtin-chat", BLOCK_SIZES="1")
    (one,) = q.runs
    one.summary, one.status, one.returncode = _summary(1), "ok", 0
    (row,) = launch.summary_rows(q)
    assert (row["speedup"], row["tau"], row["speculative_tpot"]) == (1.0, 1.0, 0.02)


def test_every_variable_is_documented():
    text = (REPO / "docs" / "WRAPPERS.md").read_text()
    for var in set(launch.BENCHMARK_VARS) | set(launch.SWEEP_VARS):
        assert f"`{var}`" in text, var
    for col in launch.CSV_COLUMNS:
        assert f"`{col}`" in text, col


def test_readme_carries_the_wrapper_docs_and_the_example_plot():
    """README's batch-run section is docs/WRAPPERS.md (image path aside), plot included."""
    readme = (REPO / "README.md").read_text()
    wrappers = (REPO / "docs" / "WRAPPERS.md").read_text()
    start = readme.index("## Batch runs: `run_benchmark.sh` and `run_block_sweep.sh`")
    end = readme.index("\n## ", start + 1)
    section = readme[start:end].strip()
    assert section == wrappers.strip().replace("](example_sweep_plot.png)",
                                               "](docs/example_sweep_plot.png)")
    assert "![example sweep plot](docs/example_sweep_plot.png)" in section
    assert is_png(REPO / "docs" / "example_sweep_plot.png")


def test_failed_run_error_line(tmp_path):
    """The error column: benchmark.py's error line of this attempt, never the '$ command' line
    (whose --continue-on-error looks like an error); a signal is named."""
    p = plan("sweep", NPROC=1, MODEL="m", DRAFT="d", DATASET="builtin-chat", BLOCK_SIZES="4",
             LOG_DIR=tmp_path)
    (run,) = p.runs
    run.log_path.parent.mkdir(parents=True)
    cmd_line = f"$ {shlex.join(run.cmd)}\n"
    assert "--continue-on-error" in cmd_line
    # killed before printing anything: the signal, not the command line
    run.log_path.write_text(cmd_line)
    run.returncode = -9
    launch._judge(run, 0.0)
    assert run.status == "failed" and run.error.startswith("killed by SIGKILL (exit status -9")
    run.returncode = 1
    launch._judge(run, 0.0)
    assert run.error == "exit status 1"
    # a resumed (appended) log: only the new attempt's lines count
    old = cmd_line + "benchmark.py: error: an old failure\n"
    run.log_path.write_text(old + cmd_line + "samples: 50%\rTraceback ...\nValueError: new one\n")
    run.log_offset = len(old.encode())
    launch._judge(run, 0.0)
    assert run.error == "ValueError: new one"
    run.log_offset = 0
    launch._judge(run, 0.0)
    assert run.error == "benchmark.py: error: an old failure"


def test_hub_model_failure_gets_a_wrapper_hint():
    run = plan(NPROC=1, TASKS="aime25:1", MODEL="Qwen/Qwen3-4B", DRAFT="d").runs[0]
    run.status = "failed"
    run.error = ("benchmark.py: error: target model 'Qwen/Qwen3-4B' cannot be reached on the "
                 "Hugging Face hub and is not cached (LocalEntryNotFoundError) (...)")
    hint = launch.wrapper_hint(run)
    assert "MODEL=embedded DRAFT=embedded" in hint and "MODEL=/local" in hint
    run.error = "benchmark.py: error: --block-size must be >= 1, got 0"
    assert launch.wrapper_hint(run) is None
