"""Issue 9: crash-safe, resumable, validated runs.

* SIGKILL in the middle of benchmark.py, then --resume: per-sample results equal an
  uninterrupted run with the same seed (tokens, tau, histograms, texts; timings may differ).
* SIGINT / SIGTERM: a summary of the finished samples, exit 130 / 143, no process left behind
  (single process, and torchrun with 2 ranks).
* A JSONL with a truncated last line, or from another configuration; failed units (OOM).
* A table of bad inputs for every CLI: non-zero exit, one line on stderr, no traceback,
  nothing written to the output location.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import EMBEDDED, REPO
from dflash.bench import benchmark_cli
from dflash.bench import dynamic_cli as dynamic_bench
from dflash.bench import multiround_cli
from dflash.serving import sglang as serving
from dflash.errors import UserError, run_cli
from dflash.runlog import (GracefulStop, RunLog, atomic_write_json, config_diff, precheck,
                           read_jsonl)

PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


# ----------------------------------------------------------------------------- helpers
def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("DFLASH_VERBOSE", None)
    return env


def _models(toy_pair, embedded_if_built: bool = False) -> list[str]:
    """The random toy pair, or the embedded pair when asked for and built."""
    if embedded_if_built and EMBEDDED:
        return ["--model-name-or-path", "embedded", "--draft-name-or-path", "embedded"]
    target, draft = toy_pair
    return ["--model-name-or-path", str(target), "--draft-name-or-path", str(draft)]


def _samples(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records, _ = read_jsonl(path)
    return [r for r in records if r.get("type") == "sample"]


def _wait_for_samples(proc: subprocess.Popen, jsonl: Path, n: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while len(_samples(jsonl)) < n:
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {n} samples: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"no {n} samples in {jsonl} after {timeout} s")
        time.sleep(0.02)


def _processes_mentioning(text: str) -> list[int]:
    """PIDs (other than ours) whose command line contains ``text``: the process table check."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


def _no_process_left(marker: str, grace: float = 10.0) -> list[int]:
    end = time.monotonic() + grace
    while (left := _processes_mentioning(marker)) and time.monotonic() < end:
        time.sleep(0.1)
    return left


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unit_view(rec: dict) -> dict:
    """The part of a sample's result that must not depend on interruptions (no timings)."""
    out = {"id": rec["id"], "prompt_tokens": rec.get("prompt_tokens"),
           "greedy_match": rec.get("greedy_match"), "output_text": rec.get("output_text")}
    for mode in ("baseline", "speculative"):
        m = rec.get(mode) or {}
        out[mode] = {k: m.get(k) for k in ("tokens", "turns", "cycles", "tau",
                                           "acceptance_histogram", "block_sizes")}
    return out


# ----------------------------------------------------------------------------- (1) kill + resume
def test_sigkill_then_resume_equals_uninterrupted_run(toy_pair, tmp_path):
    common = ["benchmark.py", "--dataset", "builtin-chat", "--max-samples", "6",
              *_models(toy_pair, embedded_if_built=True),
              "--max-new-tokens", "32", "--block-size", "4", "--temperature", "0.9",
              "--seed", "7", "--warmup-runs", "0"]
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    popen = dict(cwd=REPO, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    uninterrupted = subprocess.Popen([PY, *common, "--save-outputs-path", str(full)], **popen)
    victim = subprocess.Popen([PY, *common, "--save-outputs-path", str(cut)], **popen)
    _wait_for_samples(victim, cut, 2)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    done_before = len(_samples(cut))
    assert 2 <= done_before < 6
    assert not cut.with_suffix(".summary.json").exists()  # killed: no summary yet
    with open(cut, "a") as fh:  # a crash in the middle of writing a record
        fh.write('{"type": "sample", "id": "builtin-chat/3", "baseline": {"tok')

    out, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err

    res = subprocess.run([PY, *common, "--save-outputs-path", str(cut), "--resume"],
                         capture_output=True, **{k: v for k, v in popen.items()
                                                 if k not in ("stdout", "stderr")}, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "ignored 1 partial line" in res.stderr
    assert f"resuming: {done_before} finished sample(s)" in res.stderr

    a = json.loads(full.with_suffix(".summary.json").read_text())
    b = json.loads(cut.with_suffix(".summary.json").read_text())
    assert a["complete"] and b["complete"]
    assert b["samples_resumed"] == done_before and b["jsonl_ignored_lines"] == 1
    assert a["sample_ids"] == b["sample_ids"] == [f"builtin-chat/{i}" for i in range(6)]
    assert [_unit_view(r) for r in a["per_sample"]] == [_unit_view(r) for r in b["per_sample"]]
    for mode in ("baseline", "speculative"):
        for key in ("tokens", "tau", "acceptance_histogram", "cycles"):
            assert a[mode][key] == b[mode][key], (mode, key)
    # the generated texts (kept in the JSONL only) are identical too; every line but the
    # partial one parses, and each sample is recorded once
    texts_a = {r["id"]: r["output_text"] for r in _samples(full)}
    texts_b = {r["id"]: r["output_text"] for r in _samples(cut)}
    assert texts_a == texts_b
    assert sorted(r["id"] for r in _samples(cut)) == sorted(texts_a)
    records, bad = read_jsonl(cut)
    assert bad == 1 and records[0]["type"] == "header"


# ----------------------------------------------------------------------------- (2) signals
@pytest.mark.parametrize("script, sig, code", [
    ("benchmark.py", signal.SIGINT, 130),
    ("benchmark_dynamic_schedule.py", signal.SIGTERM, 143),
])
def test_signal_writes_summary_of_finished_samples(script, sig, code, toy_pair, tmp_path):
    jsonl = tmp_path / "run.jsonl"
    extra = ["--block-size", "4"] if script == "benchmark.py" else \
        ["--candidate-block-sizes", "2,4", "--skip-baseline"]
    proc = subprocess.Popen(
        [PY, script, "--dataset", "builtin-math", "--max-samples", "12", *_models(toy_pair),
         "--max-new-tokens", "32", "--warmup-runs", "0", *extra,
         "--save-outputs-path", str(jsonl)],
        cwd=REPO, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_samples(proc, jsonl, 2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    summary = json.loads(jsonl.with_suffix(".summary.json").read_text())
    finished = [r["id"] for r in _samples(jsonl)]
    assert summary["complete"] is False
    assert summary["interrupted_by"] == signal.Signals(sig).name
    assert summary["samples_done"] == len(finished) >= 2
    assert [r["id"] for r in summary["per_sample"]] == finished
    assert "rerun with --resume" in out
    assert _no_process_left(str(tmp_path)) == []


def test_sigint_under_torchrun_two_ranks_leaves_no_process(toy_pair, tmp_path):
    jsonl = tmp_path / "tr.jsonl"
    cmd = [TORCHRUN, "--nproc_per_node=2", f"--master_port={_free_port()}", "benchmark.py",
           "--dataset", "builtin-chat", "--max-samples", "16", *_models(toy_pair),
           "--max-new-tokens", "32", "--block-size", "4", "--warmup-runs", "0",
           "--save-outputs-path", str(jsonl)]
    # Ctrl-C in a terminal signals the whole foreground process group: torchrun and workers
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for_samples(proc, jsonl, 2)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # torchrun turns the signal into its own SignalException: it prints that traceback and
    # exits 1 whatever its workers did (torch 2.x; docs/ROBUSTNESS.md). No traceback of ours.
    assert proc.returncode in (1, 130), err[-3000:]
    for tb in err.split("Traceback (most recent call last):")[1:]:
        assert "SignalException" in tb and "dflash" not in tb, tb
    summary = json.loads(jsonl.with_suffix(".summary.json").read_text())
    finished = sorted(r["id"] for r in _samples(jsonl))
    assert summary["world_size"] == 2 and summary["complete"] is False
    assert summary["interrupted_by"] == "SIGINT"
    assert sorted(summary["sample_ids"]) == finished and len(finished) >= 2
    assert "run interrupted (SIGINT)" in out
    assert _no_process_left(str(tmp_path)) == [], "a torchrun worker was left behind"


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_multiround_second_sigint_during_shutdown(delay, toy_pair, tmp_path):
    """benchmark_multiround_spec.py: Ctrl-C keeps the finished samples (summary, exit 130);
    a second Ctrl-C right after (while the summary is written, or while the interpreter
    shuts down) changes nothing: still 130, no traceback, no death by SIGINT."""
    jsonl = tmp_path / "mr.jsonl"
    proc = subprocess.Popen(
        [PY, "benchmark_multiround_spec.py", "--dataset", "builtin-math", "--max-samples", "12",
         *_models(toy_pair), "--max-new-tokens", "24", "--round-block-sizes", "4,3",
         "--warmup-runs", "0", "--save-outputs-path", str(jsonl)],
        cwd=REPO, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_samples(proc, jsonl, 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err
    summary = json.loads(jsonl.with_suffix(".summary.json").read_text())
    finished = [r["id"] for r in _samples(jsonl)]
    assert summary["complete"] is False and summary["interrupted_by"] == "SIGINT"
    assert summary["samples_done"] == len(finished) >= 2 and summary["samples_expected"] == 12
    assert [r["id"] for r in summary["per_sample"]] == finished
    assert "run interrupted (SIGINT)" in out and "rerun with --resume" in out


def test_wrapper_counts_a_signalled_torchrun_as_interrupted(tmp_path):
    """torchrun exits 1 when signalled; the wrappers read the summary rank 0 wrote."""
    from dflash.bench import launch

    summary = tmp_path / "s.json"
    summary.write_text(json.dumps({"complete": False, "interrupted_by": "SIGTERM"}))
    run = launch.Run(name="r", dataset="d", max_samples=1, block_size=4, role="run", cmd=["x"],
                     log_path=tmp_path / "r.log", json_path=summary,
                     jsonl_path=tmp_path / "r.jsonl", returncode=1)
    launch._judge(run, time.time())
    assert run.status == "interrupted" and "SIGTERM" in run.error
    summary.write_text(json.dumps({"complete": False, "interrupted_by": None}))
    (tmp_path / "r.log").write_text("benchmark.py: error: boom\n")
    launch._judge(run, time.time())
    assert run.status == "failed"


def test_graceful_stop_semantics():
    """First signal aborts the unit (unless committing); later ones and the summary phase
    are only noted; handlers are restored afterwards."""
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)  # second signal: noted, nothing raised
        time.sleep(0.01)
        assert stop.requested and stop.signal_name == "SIGINT" and stop.exit_code() == 130
    assert signal.getsignal(signal.SIGINT) is before
    with GracefulStop() as stop:
        with stop.committing():
            os.kill(os.getpid(), signal.SIGTERM)  # a record being written is not cut short
            time.sleep(0.01)
        stop.disarm()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.exit_code() == 143
    with GracefulStop() as stop:
        assert not stop.requested and stop.exit_code() == 0


# ----------------------------------------------------------------------------- (3) run log
CONFIG = {"script": "benchmark.py", "model": "m", "block_size": 4, "max_new_tokens": 16,
          "max_samples": 3, "output_json": "a.json"}


def test_truncated_last_line_is_ignored_reported_and_not_fatal(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    log = RunLog(path, CONFIG)
    log.add({"id": "s/0", "tokens": 3})
    log.add({"id": "s/1", "error": "out of memory: CUDA out of memory"})
    with open(path, "a") as fh:
        fh.write('{"type": "sample", "id": "s/2", "tok')  # killed mid-write
    # volatile keys (max_samples, output paths) may change on resume
    log = RunLog(path, {**CONFIG, "max_samples": 10, "output_json": "b.json"}, resume=True)
    assert "ignored 1 partial line(s)" in capsys.readouterr().err
    assert set(log.done) == {"s/0"} and set(log.failed) == {"s/1"}  # failures are retried
    assert log.ignored_lines == 1 and "type" not in log.done["s/0"]
    log.add({"id": "s/2", "tokens": 5})
    log.add({"id": "s/1", "tokens": 4})
    lines = path.read_text().splitlines()
    assert lines[3].startswith('{"type": "sample", "id": "s/2", "tok') and lines[3].endswith("tok")
    records, bad = read_jsonl(path)
    assert bad == 1 and [r.get("id") for r in records] == [None, "s/0", "s/1", "s/2", "s/1"]
    log = RunLog(path, CONFIG, resume=True)
    assert set(log.done) == {"s/0", "s/1", "s/2"} and not log.failed
    assert sum(1 for r in read_jsonl(path)[0] if r["type"] == "header") == 1


def test_other_configuration_is_refused_not_mixed(tmp_path):
    path = tmp_path / "r.jsonl"
    RunLog(path, CONFIG).add({"id": "s/0", "tokens": 3})
    before = path.read_bytes()
    with pytest.raises(UserError, match=r"different configuration .*block_size 4 -> 8"):
        RunLog(path, {**CONFIG, "block_size": 8}, resume=True)
    with pytest.raises(UserError, match="already holds results"):
        RunLog(path, CONFIG)
    with pytest.raises(UserError, match="block_size"):  # the pre-load check says the same
        precheck(path, {**CONFIG, "block_size": 8}, resume=True)
    precheck(path, {**CONFIG, "block_size": None}, resume=True, unknown=["block_size"])
    headerless = tmp_path / "h.jsonl"
    headerless.write_text('{"type": "sample", "id": "x"}\n')
    with pytest.raises(UserError, match="no header"):
        RunLog(headerless, CONFIG, resume=True)
    assert path.read_bytes() == before
    assert config_diff({"a": [1, 2]}, {"a": (1, 2)}) == []


def test_atomic_summary_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "s.json"
    atomic_write_json(path, {"x": 1, "nan": float("nan")})
    assert json.loads(path.read_text()) == {"x": 1, "nan": None}
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})
    assert json.loads(path.read_text())["x"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]  # no temporary left


# ----------------------------------------------------------------------------- OOM units
def _oom_on(module, sample_id, monkeypatch, calls):
    """``module.run_sample`` runs out of memory on ``sample_id`` (every CLI's run_sample takes
    the prompt third); ``bench.free_memory`` only counts its calls."""
    real = module.run_sample

    def fake(*a):
        if a[2]["id"] == sample_id:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a)

    monkeypatch.setattr(module, "run_sample", fake)
    monkeypatch.setattr(module.bench, "free_memory", lambda: calls.append(1))


@pytest.mark.parametrize("cli", ["benchmark", "multiround", "dynamic"])
def test_out_of_memory_unit_stops_or_continues(cli, toy_pair, tmp_path, monkeypatch, capsys):
    """The same failed-unit handling in every CLI (dflash.bench.units): recorded with its error,
    summary written, exit 1 in one line; --continue-on-error goes on (exit 0); --resume
    retries the failed unit."""
    module = {"benchmark": benchmark_cli, "multiround": multiround_cli,
              "dynamic": dynamic_bench}[cli]
    jsonl, summary_json = tmp_path / "r.jsonl", tmp_path / "s.json"
    argv = _cli_argv(cli, toy_pair, tmp_path)
    for flag, value in (("--max-samples", "3"), ("--max-new-tokens", "8"), ("--warmup-runs", "0")):
        argv = _set(argv, flag, value)
    calls = []
    _oom_on(module, "builtin-code/1", monkeypatch, calls)
    # default: stop at the failing unit, record it, write the summary, exit 1 (one line)
    with pytest.raises(SystemExit) as exit_:
        run_cli(module.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and calls == [1]
    assert "out of memory on sample builtin-code/1" in err[-1] and "--continue-on-error" in err[-1]
    assert "Traceback" not in "\n".join(err)
    summary = json.loads(summary_json.read_text())
    assert summary["stopped_on_error"] and not summary["complete"]
    assert summary["interrupted_by"] is None and summary["samples_expected"] == 3
    assert summary["samples_done"] == 2 and summary["samples_failed"] == 1
    assert [("error" in r) for r in _samples(jsonl)] == [False, True]
    # --resume --continue-on-error: the failed unit is retried (fails again), the run goes on
    assert module.main(argv + ["--resume", "--continue-on-error"]) == 0
    summary = json.loads(summary_json.read_text())
    assert summary["complete"] and summary["samples_done"] == 3 and summary["samples_failed"] == 1
    assert summary["per_sample"][1]["error"].startswith("out of memory")
    assert summary["samples_resumed"] == 1
    # the memory is back: --resume retries the failed unit and completes the run
    monkeypatch.undo()
    assert module.main(argv + ["--resume"]) == 0
    summary = json.loads(summary_json.read_text())
    assert summary["complete"] and summary["samples_failed"] == 0 and summary["samples_resumed"] == 2
    assert [r["id"] for r in summary["per_sample"]] == [f"builtin-code/{i}" for i in range(3)]


# ----------------------------------------------------------------------------- (4) bad inputs
def _base_argv(toy_pair, out: Path) -> list[str]:
    target, draft = toy_pair
    return ["--dataset", "builtin-code", "--max-samples", "2", "--model-name-or-path", str(target),
            "--draft-name-or-path", str(draft), "--max-new-tokens", "16", "--block-size", "4",
            "--save-outputs-path", str(out / "r.jsonl"), "--output-json", str(out / "s.json")]


def _cli_argv(cli: str, toy_pair, out: Path) -> list[str]:
    """A valid argv of a Transformers CLI on the toy pair, writing r.jsonl and s.json in out."""
    argv = _base_argv(toy_pair, out)
    if cli == "dynamic":
        argv = _set(argv, "--block-size", None) + ["--candidate-block-sizes", "2,4"]
    elif cli == "multiround":
        argv = _set(argv, "--block-size", None) + ["--round-block-sizes", "4,3"]
    return argv


def _prior_jsonl(cli: str, tmp_path: Path, toy_pair, **change) -> Path:
    """A JSONL holding one sample under the header ``cli`` writes for its base argv (the
    configuration each CLI computes before loading models), with ``change`` applied."""
    target, draft = toy_pair
    argv = _cli_argv(cli, toy_pair, tmp_path / "unused")
    if cli == "benchmark":
        args = benchmark_cli.build_parser().parse_args(argv)
        config = benchmark_cli.run_config(args, str(target), str(draft), "float32", 4)
    elif cli == "dynamic":
        args = dynamic_bench.build_parser().parse_args(argv)
        config = dynamic_bench.run_config(args, str(target), str(draft), 8, "float32", [2, 4])
    else:
        args = multiround_cli.build_parser().parse_args(argv)
        config = multiround_cli.planned_config(args, [4, 3], torch.device("cpu"), str(target),
                                               str(draft))
    config = {**config, **change}
    path = tmp_path / "prior" / "run.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"type": "header", "config": config}) + "\n"
                    + json.dumps({"type": "sample", "id": "builtin-code/0"}) + "\n")
    return path


def _set(argv: list[str], flag: str, value: str | None) -> list[str]:
    """argv with ``flag`` replaced (value None: removed)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        out.append(a)
    return out + ([flag, value] if value is not None else [])


# (cli, edit of the base argv, text the one line must contain)
# edits: list of (flag, value) replacing the base's, or ("+", [args]) appended
BENCHMARK_CASES = [
    ([("--dataset", "no-such-set")], "unknown dataset 'no-such-set'"),
    ([("--dataset", None)], "--dataset"),
    ([("--max-samples", "0")], "--max-samples must be >= 1"),
    ([("--max-samples", "-3")], "--max-samples must be >= 1"),
    ([("--max-samples", "two")], "invalid int value"),
    ([("--max-new-tokens", "0")], "--max-new-tokens must be in 1.."),
    ([("--max-new-tokens", "99999999")], "--max-new-tokens must be in 1.."),
    ([("--max-new-tokens", "1.5")], "invalid int value"),
    ([("--temperature", "-0.5")], "--temperature must be"),
    ([("--temperature", "nan")], "--temperature must be"),
    ([("--temperature", "inf")], "--temperature must be"),
    ([("--temperature", "hot")], "invalid float value"),
    ([("--seed", "-1")], "--seed must be in"),
    ([("--block-size", "0")], "--block-size must be >= 1"),
    ([("--block-size", "-4")], "--block-size must be >= 1"),
    ([("--block-size", "5000")], "--block-size must be in 1..1024"),
    ([("--warmup-runs", "-1")], "--warmup-runs must be in 0.."),
    ([("--block-size", "1"), ("+", ["--skip-baseline"])], "cannot be combined with --skip-baseline"),
    ([("--device", "tpu")], "--device must be auto, cpu, cuda or cuda:N"),
    ([("--dtype", "float8")], "--dtype must be one of"),
    ([("--engine", "turbo")], "invalid choice: 'turbo'"),
    ([("+", ["--no-such-flag"])], "unrecognized arguments: --no-such-flag"),
    ([("--model-name-or-path", "/no/such/model")], "target model '/no/such/model' does not exist"),
    ([("--model-name-or-path", "{NOCFG}")], "has no config.json"),
    ([("--model-name-or-path", "{FILE}")], "is a file, not a model folder"),
    ([("--model-name-or-path", "")], "--model-name-or-path is empty"),
    ([("--draft-name-or-path", "./no/such/draft")], "draft './no/such/draft' does not exist"),
    ([("--save-outputs-path", "{FILE}/r.jsonl")], "is a file, not a folder"),
    ([("--output-json", "{OUT}")], "is a directory"),
    ([("--output-json", "{OUT}/r.jsonl")], "are the same file"),
    ([("--save-outputs-path", None), ("+", ["--resume"])], "--resume needs"),
    ([("--save-outputs-path", "{PRIOR_SAME}")], "already holds results"),
    ([("--save-outputs-path", "{PRIOR_OTHER}"), ("+", ["--resume"])],
     "different configuration (differs in: max_new_tokens 99 -> 16)"),
    ([("--save-outputs-path", "{PRIOR_OTHER}"), ("--block-size", None), ("+", ["--resume"])],
     "different configuration"),
    ([("--save-outputs-path", "{HEADERLESS}"), ("+", ["--resume"])], "no header record"),
    ([("--model-name-or-path", "{REMOTE}")], "needs its own code"),
]
if not torch.cuda.is_available():
    BENCHMARK_CASES.append(([("--device", "cuda")], "CUDA is not available"))

DYNAMIC_CASES = [
    ([("--candidate-block-sizes", "1,8")], "must be >= 2"),
    ([("--candidate-block-sizes", "8,x")], "must be integers"),
    ([("--candidate-block-sizes", "")], "empty"),
    ([("--ewma-alpha", "0")], "--ewma-alpha must be in (0, 1]"),
    ([("--required-streak", "0")], "--required-streak"),
    ([("--policy", "random")], "invalid choice: 'random'"),
    ([("--temperature", "-1")], "--temperature must be"),
    ([("--dataset", "nope")], "unknown dataset 'nope'"),
    ([("--draft-name-or-path", "/no/draft")], "does not exist"),
    ([("--save-outputs-path", "{PRIOR_SAME}")], "already holds results"),
    ([("--save-outputs-path", "{PRIOR_OTHER}"), ("+", ["--resume"])],
     "different configuration (differs in: max_new_tokens 99 -> 16)"),
    ([("--warmup-runs", "-1")], "--warmup-runs must be >= 0"),
    ([("--output-json", "{FILE}/s.json")], "is a file, not a folder"),
]

MULTIROUND_CASES = [
    ([("--round-block-sizes", "1,4")], "--round-block-sizes must be >= 2"),
    ([("--round-block-sizes", "16,x")], "--round-block-sizes must be integers, got 'x'"),
    ([("--single-block-size", "1")], "--single-block-size must be >= 2"),
    ([("--mode", "tree"), ("--engine", "hf")], "needs the static engine"),
    ([("--mode", "sideways")], "invalid choice: 'sideways'"),
    ([("--max-new-tokens", "0")], "--max-new-tokens"),
    ([("--model-name-or-path", "/no/model")], "does not exist"),
    ([("--temperature", "-1")], "--temperature must be"),
    ([("--dataset", "nope")], "unknown dataset 'nope'"),
    ([("--warmup-runs", "-1")], "--warmup-runs must be >= 0"),
    ([("--output-json", "{OUT}")], "is a directory"),
    ([("--save-outputs-path", "{FILE}/r.jsonl")], "is a file, not a folder"),
    ([("--save-outputs-path", None), ("+", ["--resume"])], "--resume needs"),
    ([("--save-outputs-path", "{PRIOR_SAME}")], "already holds results"),
    ([("--save-outputs-path", "{PRIOR_OTHER}"), ("+", ["--resume"])],
     "different configuration (differs in: max_new_tokens 99 -> 16)"),
    ([("--save-outputs-path", "{PRIOR_OTHER}"), ("--round-block-sizes", "4,2"),
      ("--max-new-tokens", "99"), ("+", ["--resume"])],
     "different configuration (differs in: round_block_sizes [4, 3] -> [4, 2])"),
    ([("--save-outputs-path", "{HEADERLESS}"), ("+", ["--resume"])], "no header record"),
]

SGLANG_BASE = ["--dataset-name", "builtin-math", "--base-url", "http://127.0.0.1:9",
               "--no-chat-template", "--output-md", "{OUT}/r.md"]
SGLANG_CASES = [
    ([("--concurrencies", "0")], "not a positive integer"),
    ([("--concurrencies", "1,x")], "not an integer"),
    ([("--port", "70000")], "--port must be in 0..65535"),
    ([("--temperature", "-1")], "--temperature must be >= 0"),
    ([("--mem-fraction-static", "1.5")], "--mem-fraction-static"),
    ([("--dataset-name", "nope")], "unknown dataset 'nope'"),
    ([("--base-url", "ftp://x")], "is not an http(s) URL"),
    ([("--base-url", None)], "--target-model is required"),
    ([("--max-new-tokens", "0")], "--max-new-tokens must be >= 1"),
    ([("--connect-wait-s", "-1")], "--connect-wait-s must be"),
    ([("--output-md", "{FILE}/r.md")], "is a file, not a folder"),
    ([("--output-md", "{OUT}")], "is a directory"),
    ([("+", ["--output-json", "{FILE}/r.json"])], "--output-json"),
    ([("+", ["--results-jsonl", "{OUT}"])], "--results-jsonl"),
    ([("+", ["--output-json", "{OUT}/r.md"])], "--output-json and --output-md are the same file"),
    ([("--base-url", None), ("+", ["--target-model", "t", "--draft-model", "d",
                                   "--server-log-dir", "{FILE}"])],
     "--server-log-dir"),
    ([("--base-url", "http://127.0.0.1:{CLOSED}"), ("+", ["--connect-wait-s", "0"])],
     "no server could be reached"),
]


def _cases():
    out = []
    for cli, cases in (("benchmark", BENCHMARK_CASES), ("dynamic", DYNAMIC_CASES),
                       ("multiround", MULTIROUND_CASES), ("sglang", SGLANG_CASES)):
        for i, (edits, needle) in enumerate(cases):
            out.append(pytest.param(cli, edits, needle, id=f"{cli}-{i}"))
    return out


def test_bad_input_table_has_enough_cases():
    assert len(_cases()) >= 25
    per_cli = {}
    for case in _cases():
        per_cli[case.values[0]] = per_cli.get(case.values[0], 0) + 1
    assert set(per_cli) == {"benchmark", "dynamic", "multiround", "sglang"}
    assert min(per_cli.values()) >= 10, per_cli


@pytest.fixture(scope="module")
def fixtures_dir(tmp_path_factory, toy_pair):
    """Paths the bad-input cases refer to: a plain file, a folder without config.json, prior
    JSONLs (same / other configuration, no header), a model that needs remote code."""
    root = tmp_path_factory.mktemp("badinput")
    (root / "file.txt").write_text("not a folder\n")
    (root / "nocfg").mkdir()
    remote = root / "remote"
    remote.mkdir()
    marker = root / "REMOTE_CODE_RAN"
    (remote / "config.json").write_text(json.dumps({
        "model_type": "dflash_unknown_arch", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                     "AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (remote / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (remote / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    return root


def _materialise(cli, edits, toy_pair, out: Path, fx: Path) -> tuple[list[str], list[Path]]:
    argv = list(SGLANG_BASE) if cli == "sglang" else _cli_argv(cli, toy_pair, out)
    for flag, value in edits:
        argv = argv + value if flag == "+" else _set(argv, flag, value)
    prior = []
    subst = {"{OUT}": str(out), "{FILE}": str(fx / "file.txt"), "{NOCFG}": str(fx / "nocfg"),
             "{REMOTE}": str(fx / "remote"), "{CLOSED}": str(_free_port())}
    for key, change in (("{PRIOR_SAME}", {}), ("{PRIOR_OTHER}", {"max_new_tokens": 99})):
        if any(key in a for a in argv):
            path = _prior_jsonl(cli, out.parent, toy_pair, **change)
            subst[key] = str(path)
            prior.append(path)
    if any("{HEADERLESS}" in a for a in argv):
        path = out.parent / "prior" / "headerless.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_text('{"type": "sample", "id": "builtin-code/0"}\n')
        subst["{HEADERLESS}"] = str(path)
        prior.append(path)
    for key, value in subst.items():
        argv = [a.replace(key, value) for a in argv]
    return argv, prior


def _forbid_model_loading(monkeypatch) -> None:
    import transformers

    from dflash import DFlashDraftModel

    def loaded(*_a, **_k):
        raise AssertionError("a model was loaded before the bad input was refused")

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, DFlashDraftModel):
        monkeypatch.setattr(cls, "from_pretrained", loaded)


MAINS = {"benchmark": benchmark_cli.main, "dynamic": dynamic_bench.main,
         "multiround": multiround_cli.main, "sglang": serving.main}


@pytest.mark.parametrize("cli, edits, needle", _cases())
def test_bad_input_one_line_nonzero_nothing_written(cli, edits, needle, toy_pair, fixtures_dir,
                                                     tmp_path, capsys, monkeypatch):
    """Every case is refused before any model (or tokenizer) loads: loading one fails the
    case with an AssertionError line instead of the expected one."""
    monkeypatch.delenv("DFLASH_VERBOSE", raising=False)
    _forbid_model_loading(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    argv, prior = _materialise(cli, edits, toy_pair, out, fixtures_dir)
    before = {p: p.read_bytes() for p in prior}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(MAINS[cli], argv)
    _, err = capsys.readouterr()
    lines = [l for l in err.splitlines() if l.strip()]
    assert exit_.value.code not in (0, None)
    assert len(lines) == 1, err
    assert "Traceback" not in err and needle in lines[0], lines[0]
    assert list(out.iterdir()) == [], "something was written to the output location"
    assert {p: p.read_bytes() for p in prior} == before, "a prior JSONL was modified"
    assert sorted(p.name for p in (out.parent / "prior").iterdir()) == \
        sorted(p.name for p in prior) if prior else True
    assert not (fixtures_dir / "REMOTE_CODE_RAN").exists(), "remote code ran without the flag"


def test_verbose_shows_the_traceback(toy_pair, tmp_path, capsys):
    argv = _base_argv(toy_pair, tmp_path) + ["--block-size", "0", "--verbose"]
    with pytest.raises(SystemExit) as exit_:
        run_cli(benchmark_cli.main, argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" in err and "--block-size must be" in err


def test_unexpected_error_is_one_line_exit_1(capsys, monkeypatch):
    monkeypatch.delenv("DFLASH_VERBOSE", raising=False)

    def broken(argv):
        raise RuntimeError("something\nbroke")

    with pytest.raises(SystemExit) as exit_:
        run_cli(broken, [])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1
    assert "RuntimeError: something" in err[0] and "--verbose" in err[0]


# ----------------------------------------------------------------------------- SGLang client
def _sglang_argv(tmp_path: Path, url: str, *extra: str) -> list[str]:
    return ["--dataset-name", "builtin-math", "--base-url", url, "--no-chat-template",
            "--concurrencies", "1", "--questions-per-concurrency-base", "1",
            "--max-new-tokens", "8", "--output-md", str(tmp_path / "r.md"),
            "--poll-interval-s", "0.05", *extra]


def test_sglang_unreachable_base_url_fails_fast_and_touches_nothing(tmp_path, capsys,
                                                                  monkeypatch):
    """Nothing answers at --base-url: one line, exit 2, after --connect-wait-s; the previous
    report and results log of the same name are left as they were (nothing ran, so there is
    nothing to report, and a report of nothing would replace the old one)."""
    monkeypatch.delenv("DFLASH_VERBOSE", raising=False)
    old = {tmp_path / "r.md": "old report\n",
           tmp_path / "r.jsonl": '{"record": "header", "identity": {}}\n'}
    for path, text in old.items():
        path.write_text(text)
    url = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        run_cli(serving.main, _sglang_argv(tmp_path, url, "--connect-wait-s", "0.5"))
    took = time.monotonic() - t0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(err) == 1, err
    assert f"--base-url {url}: no server could be reached for 0.5 s" in err[0]
    assert "connection refused" in err[0] and "--connect-wait-s" in err[0]
    assert 0.45 <= took < 10
    assert {p: p.read_text() for p in tmp_path.iterdir()} == old  # no report, no .bak


def test_sglang_base_url_that_comes_up_within_connect_wait(tmp_path, capsys):
    """A server still starting (connection refused for a while) is waited for."""
    import threading

    from tests.serving.fake_sglang_server import FakeServer

    port = _free_port()
    started = {}

    def start():
        started["server"] = FakeServer(["--port", str(port), "--fake-latency-s", "0.01"])
        started["server"].__enter__()

    timer = threading.Timer(0.6, start)
    timer.start()
    try:
        code = serving.main(_sglang_argv(tmp_path, f"http://127.0.0.1:{port}",
                                         "--connect-wait-s", "30"))
    finally:
        timer.join()
        if "server" in started:
            started["server"].__exit__(None, None, None)
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "complete"
    recs = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r.get("concurrency") for r in recs[1:]] == [1]


def test_output_piped_into_head_stops_quietly():
    """``python -m dflash.bench.analyze ... | head``: no BrokenPipeError traceback, exit 0."""
    import subprocess
    import sys

    code = ("from dflash.errors import run_cli\n"
            "def main(argv):\n"
            "    for _ in range(200000):\n"
            "        print('row ' * 20)\n"
            "run_cli(main)\n")
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    reader = subprocess.run(["head", "-n", "1"], stdin=writer.stdout, capture_output=True)
    writer.stdout.close()
    err = writer.stderr.read().decode()
    assert writer.wait(timeout=60) == 0, err
    assert reader.stdout.decode().startswith("row")
    assert "Traceback" not in err and "BrokenPipe" not in err, err
