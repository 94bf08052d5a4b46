"""benchmark_sglang.py / dflash.serving.sglang against the fake SGLang server (a test double), on CPU.

Every server here is tests/serving/fake_sglang_server.py on 127.0.0.1; every request loop is bounded.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dflash.serving import sglang as serving
from tests.serving.fake_sglang_server import FakeServer

REPO = Path(__file__).resolve().parents[2]
FAKE = REPO / "tests" / "serving" / "fake_sglang_server.py"
SEED_ARGS = ["--dataset-name", "aime25", "--target-model", "Qwen/Qwen3-4B",
             "--draft-model", "z-lab/Qwen3-4B-DFlash-b16", "--concurrencies", "1,2,4",
             "--questions-per-concurrency-base", "8", "--max-questions-per-config", "64",
             "--max-new-tokens", "256", "--output-md", "sglang_quick.md"]


def fake_cmd(*extra: str) -> str:
    return " ".join([sys.executable, str(FAKE), "--fake-latency-s", "0.03", *map(str, extra)])


def bench(argv, capsys) -> tuple[int, str, str]:
    """Run the CLI in-process; (exit code, stdout, stderr)."""
    try:
        serving.cli([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def common(tmp_path, concurrencies="1,2", base=2, max_new=24, md="r.md"):
    return ["--dataset-name", "builtin-math", "--target-model", "fake/target",
            "--draft-model", "fake/draft", "--no-chat-template", "--concurrencies", concurrencies,
            "--questions-per-concurrency-base", base, "--max-new-tokens", max_new,
            "--output-md", tmp_path / md, "--poll-interval-s", "0.05"]


def launch_args(tmp_path, *fake_extra, backends="flashinfer", **kw):
    return common(tmp_path, **kw) + [
        "--port", "0", "--attention-backends", backends, "--stop-grace-s", "5",
        "--server-cmd", fake_cmd("--fake-pid-dir", tmp_path / "pids", *fake_extra)]


def run_cli_process(args, cwd, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("DFLASH_VERBOSE", None)
    env.pop(serving.LAUNCH_ENV_VAR, None)
    return subprocess.run([sys.executable, str(REPO / "benchmark_sglang.py"), *args], cwd=cwd,
                          env=env, text=True, capture_output=True, timeout=timeout)


def error_line(err: str) -> str:
    """The error must be exactly one line (after any server-log tail), without traceback."""
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if "error:" in l]
    assert len(lines) == 1, err
    return lines[0]


def live_pids(pid_dir: Path) -> list[int]:
    if not pid_dir.exists():
        return []
    alive = []
    for f in pid_dir.glob("*.pid"):
        pid = int(f.read_text())
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def md_table(md: str, backend: str) -> dict[str, list[str]]:
    block = md.split(f"## Attention backend: {backend}")[1]
    rows = {}
    for line in block.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if set(cells[0]) != {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


# ----------------------------------------------------------------------------- (1) the sweep

def test_sweep_exact_concurrency_and_reports_match_server(tmp_path, capsys):
    concs, base = [1, 3, 4], 2
    argv = common(tmp_path, concurrencies="1,3,4", base=base, max_new=40)
    seen = {}
    for mode, extra in (("baseline", []), ("dflash", ["--speculative-algorithm", "DFLASH"])):
        with FakeServer(["--port", "0", "--attention-backend", "flashinfer",
                         "--fake-latency-s", "0.03", "--fake-accept-length", "3.5",
                         *extra]) as fake:
            code, out, err = bench(argv + ["--base-url", fake.url, "--resume"], capsys)
            assert code == 0, err
            seen[mode] = fake.state.stats()

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "complete"
    recs = {(r["mode"], r["concurrency"]): r for r in report["results"]}
    for mode, stats in seen.items():
        epochs = stats["epochs"]  # one per flush: warm-up c1, timed c1, warm-up c3, ...
        assert len(epochs) == 2 * len(concs)
        for k, c in enumerate(concs):
            warm, timed = epochs[2 * k], epochs[2 * k + 1]
            n = min(base * c, 64)
            assert warm["requests"] == c and warm["max_inflight_requests"] == c
            assert timed["requests"] == n
            assert timed["max_inflight_requests"] == c  # exactly c in flight, never more
            rec = recs[(mode, c)]
            assert rec["backend"] == "flashinfer" and rec["completed"] == n
            assert rec["max_inflight"] == c
            assert rec["total_output_tokens"] == timed["completion_tokens"]
            assert rec["total_input_tokens"] == timed["prompt_tokens"]
            if mode == "dflash":
                sent = timed["accept_lengths"]
                assert len(sent) == n
                assert rec["accept_length"] == pytest.approx(sum(sent) / n, rel=1e-12)
                assert rec["accept_length_source"] == "spec_accept_length"
                assert rec["server_avg_spec_accept_length"] == 3.5
            else:
                assert rec["accept_length"] is None and not timed["accept_lengths"]

    summary = report["summary"]["flashinfer"]
    md = (tmp_path / "r.md").read_text()
    rows = md_table(md, "flashinfer")
    assert list(rows) == ["metric", "baseline tok/s", "DFLASH tok/s", "speedup",
                          "acceptance length"]
    assert rows["metric"] == [f"c={c}" for c in concs]
    for j, c in enumerate(concs):
        cell = summary[str(c)]
        b, d = recs[("baseline", c)], recs[("dflash", c)]
        assert cell["baseline_output_throughput"] == b["output_throughput"]
        assert cell["dflash_output_throughput"] == d["output_throughput"]
        assert cell["speedup"] == pytest.approx(d["output_throughput"] / b["output_throughput"])
        assert cell["accept_length"] == d["accept_length"]
        assert rows["baseline tok/s"][j] == f"{b['output_throughput']:.1f}"
        assert rows["DFLASH tok/s"][j] == f"{d['output_throughput']:.1f}"
        assert rows["speedup"][j] == f"{cell['speedup']:.2f}x"
        assert rows["acceptance length"][j] == f"{d['accept_length']:.2f}"
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "r.png" in md
    # the log: a header with the run configuration, then one record per configuration
    lines = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert lines[0]["record"] == "header" and lines[0]["identity"]["max_new_tokens"] == 40
    assert [l["record"] for l in lines[1:]] == ["result"] * 6


def test_batch_requests_sends_batches_of_concurrency(tmp_path, capsys):
    with FakeServer(["--port", "0", "--speculative-algorithm", "DFLASH",
                     "--fake-latency-s", "0.02"]) as fake:
        code, _, err = bench(common(tmp_path, concurrencies="2,3") +
                             ["--base-url", fake.url, "--batch-requests"], capsys)
        assert code == 0, err
        epochs = fake.state.stats()["epochs"]
    report = json.loads((tmp_path / "r.json").read_text())
    for k, c in enumerate([2, 3]):
        timed = epochs[2 * k + 1]
        assert timed["max_inflight_requests"] == 1
        assert timed["max_inflight_sequences"] == c
        assert timed["sequences"] == 2 * c
        rec = [r for r in report["results"] if r["concurrency"] == c][0]
        assert rec["mode"] == "dflash" and rec["backend"] == "external"
        assert rec["total_output_tokens"] == timed["completion_tokens"]


def test_resume_skips_recorded_and_refuses_other_configuration(tmp_path, capsys):
    with FakeServer(["--port", "0", "--fake-latency-s", "0.01"]) as fake:
        argv = common(tmp_path, concurrencies="1,2") + ["--base-url", fake.url]
        assert bench(argv, capsys)[0] == 0
        count = fake.state.stats()["generate_count"]
        code, out, _ = bench(argv + ["--resume"], capsys)
        assert code == 0 and "already recorded" in out
        assert fake.state.stats()["generate_count"] == count  # nothing sent again
        code, _, err = bench(common(tmp_path, concurrencies="1,2", max_new=99) +
                             ["--base-url", fake.url, "--resume"], capsys)
    assert code != 0
    line = error_line(err)
    assert "--resume" in line and "max_new_tokens: 24 there, 99 now" in line


def test_existing_results_log_is_refused_without_resume_never_moved(tmp_path, capsys):
    with FakeServer(["--port", "0", "--fake-latency-s", "0.01"]) as fake:
        argv = common(tmp_path, concurrencies="1,2") + ["--base-url", fake.url]
        assert bench(argv, capsys)[0] == 0
        log = (tmp_path / "r.jsonl").read_bytes()
        count = fake.state.stats()["generate_count"]
        code, _, err = bench(argv, capsys)
        assert fake.state.stats()["generate_count"] == count  # refused before any request
    assert code == 2
    line = error_line(err)
    assert "r.jsonl already holds 2 finished configuration(s)" in line and "--resume" in line
    assert (tmp_path / "r.jsonl").read_bytes() == log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.jsonl", "r.md", "r.png"]


def test_results_log_without_results_is_started_anew_and_said(tmp_path, capsys):
    (tmp_path / "r.jsonl").write_text('{"record": "header", "identity": {}}\n')
    with FakeServer(["--port", "0", "--fake-latency-s", "0.01"]) as fake:
        code, out, err = bench(common(tmp_path, concurrencies="1") + ["--base-url", fake.url],
                               capsys)
    assert code == 0, err
    assert "r.jsonl held no finished configuration; started it anew" in out
    recs = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert recs[0]["identity"]["max_new_tokens"] == 24 and len(recs) == 2
    assert not list(tmp_path.glob("*.bak"))


# ----------------------------------------------------------------------------- (2) faults

def test_server_never_ready(tmp_path, capsys):
    code, _, err = bench(launch_args(tmp_path, "--fake-never-ready") +
                         ["--timeout-s", "1.5"], capsys)
    assert code != 0
    line = error_line(err)
    assert "not ready after 1.5 s" in line and "log:" in line
    assert "last" in err and "lines of" in err  # the server log tail came first
    assert live_pids(tmp_path / "pids") == []


def test_server_exits_before_ready(tmp_path, capsys):
    argv = common(tmp_path) + ["--port", "0", "--server-cmd",
                               f"{sys.executable} -c \"print('boom: no model'); raise SystemExit(3)\""]
    code, _, err = bench(argv, capsys)
    assert code != 0
    assert "exited with code 3 before it was ready" in error_line(err)
    assert "boom: no model" in err


@pytest.mark.parametrize("fault,expect", [
    ("--fake-fail-requests", "HTTP 500"),
    ("--fake-drop-requests", "connection dropped by the server"),
])
def test_request_fault_keeps_finished_configurations(tmp_path, capsys, fault, expect):
    # per server: c=1 warm-up (request 1) + 2 timed (2-3); c=2 warm-up (4-5) + timed (6-9)
    code, _, err = bench(launch_args(tmp_path, fault, "7", "--fake-spawn-child"), capsys)
    assert code != 0
    line = error_line(err)
    assert "baseline flashinfer c=2: request" in line and expect in line
    assert "1 configuration(s) kept" in line and "--resume" in line
    recs = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["concurrency"]) for r in recs[1:]] == [("baseline", 1)]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "failed" and expect in report["error"]
    assert "**Status: failed.**" in (tmp_path / "r.md").read_text()
    pids = list((tmp_path / "pids").glob("*.pid"))
    assert len(pids) == 2  # the fake server and its child
    assert live_pids(tmp_path / "pids") == []


def test_missing_accept_length_is_na_with_warning(tmp_path, capsys):
    code, _, err = bench(launch_args(tmp_path, "--fake-omit-fields",
                                     "spec_accept_length,spec_verify_ct",
                                     concurrencies="1"), capsys)
    assert code == 0, err
    assert "Traceback" not in err
    warn = [l for l in err.splitlines() if l.startswith("warning:")]
    assert len(warn) == 1 and "acceptance length reported as n/a" in warn[0]
    rows = md_table((tmp_path / "r.md").read_text(), "flashinfer")
    assert rows["acceptance length"] == ["n/a"]
    assert rows["DFLASH tok/s"][0] != "n/a"
    assert live_pids(tmp_path / "pids") == []


def test_sigterm_stops_servers_even_when_they_ignore_it(tmp_path):
    pid_dir = tmp_path / "pids"
    argv = launch_args(tmp_path, "--fake-ignore-sigterm", "--fake-spawn-child",
                       "--fake-latency-s", "0.3", concurrencies="1", base=50)
    argv[argv.index("--stop-grace-s") + 1] = "1"
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmark_sglang.py"),
                             *[str(a) for a in argv]], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(pid_dir.glob("*.pid"))) < 2:
            time.sleep(0.1)
        while time.monotonic() < deadline and not (tmp_path / "r.jsonl").exists():
            time.sleep(0.1)
        time.sleep(0.5)  # in the middle of the timed requests
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    line = error_line(err)
    assert "terminated by SIGTERM" in line and "servers stopped" in line
    assert live_pids(pid_dir) == []
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "interrupted"


# ----------------------------------------------------------------------------- (3) the seed

def _gpu_box() -> bool:
    if importlib.util.find_spec("sglang") is None:
        return False
    import torch
    return torch.cuda.is_available()


def test_seed_command_dry_run_prints_exact_launch_commands(tmp_path):
    res = run_cli_process([*SEED_ARGS, "--dry-run"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    common_tail = ("--tp-size 1 --dtype bfloat16 --mem-fraction-static 0.75 "
                   "--max-running-requests 64 --random-seed 0 --trust-remote-code "
                   "--host 127.0.0.1 --port 30000")
    env = "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=" + \
        os.environ.get("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "1")
    py = f"{sys.executable} -m sglang.launch_server --model-path Qwen/Qwen3-4B"
    for backend in ("flashinfer", "fa3", "fa4"):
        assert (f"{env} {py} --attention-backend {backend} {common_tail}") in lines
        assert (f"{env} {py} --speculative-algorithm DFLASH --speculative-draft-model-path "
                f"z-lab/Qwen3-4B-DFlash-b16 --attention-backend {backend} {common_tail}") in lines
    assert "c=1: 8, c=2: 16, c=4: 32" in res.stdout
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.skipif(_gpu_box(), reason="this box could really launch SGLang")
def test_seed_command_on_cpu_fails_in_one_line(tmp_path):
    res = run_cli_process(SEED_ARGS, cwd=tmp_path)
    assert res.returncode != 0
    assert res.stdout == ""
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert err[0].startswith("benchmark_sglang.py: error: SGLang needs a CUDA GPU")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- (4) launch path

def test_launch_path_runs_baseline_then_dflash(tmp_path, capsys, monkeypatch):
    pid_dir = tmp_path / "pids"
    monkeypatch.setenv(serving.LAUNCH_ENV_VAR, fake_cmd("--fake-pid-dir", str(pid_dir)))
    argv = common(tmp_path, concurrencies="1,2") + [
        "--port", "0", "--attention-backends", "flashinfer,triton", "--block-size", "8",
        "--stream", "--stop-grace-s", "5"]
    code, out, err = bench(argv, capsys)
    assert code == 0, err
    order = re.findall(r"\[(\w+)\] launching the (\w+) server", out)
    assert order == [("flashinfer", "baseline"), ("flashinfer", "DFLASH"),
                     ("triton", "baseline"), ("triton", "DFLASH")]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "complete"
    got = {(r["backend"], r["mode"], r["concurrency"]): r for r in report["results"]}
    assert set(got) == {(b, m, c) for b in ("flashinfer", "triton")
                        for m in ("baseline", "dflash") for c in (1, 2)}
    for (b, m, c), r in got.items():
        assert f"--attention-backend {b}" in r["server_cmd"]
        assert ("--speculative-algorithm DFLASH" in r["server_cmd"]) == (m == "dflash")
        assert ("--speculative-num-draft-tokens 8" in r["server_cmd"]) == (m == "dflash")
        assert r["mean_ttft_ms"] is not None and r["mean_tpot_ms"] is not None
        assert (r["accept_length"] is not None) == (m == "dflash")
        assert (tmp_path / "r_logs" / f"server_{b}_{m}.log").exists()
    for b in ("flashinfer", "triton"):
        rows = md_table((tmp_path / "r.md").read_text(), b)
        assert all(re.fullmatch(r"[\d.]+x?", cell) for row in list(rows.values())[1:]
                   for cell in row), rows
    assert len(list(pid_dir.glob("*.pid"))) == 4 and live_pids(pid_dir) == []


# ----------------------------------------------------------------------------- flags, units

@pytest.mark.parametrize("extra,expect", [
    (["--concurrencies", "1,0"], "--concurrencies: 0 is not a positive integer"),
    (["--concurrencies", "1,x"], "--concurrencies: 'x' is not an integer"),
    (["--concurrencies", "2,2"], "listed twice"),
    (["--timeout-s", "0"], "--timeout-s must be a positive number"),
    (["--block-size", "0"], "--block-size must be >= 1"),
    (["--mem-fraction-static", "1.5"], "--mem-fraction-static must be in (0, 1]"),
    (["--dataset-name", "nope"], "unknown dataset 'nope'"),
    (["--base-url", "localhost:30000"], "is not an http(s) URL"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--stream", "--batch-requests"], "--stream cannot be combined with --batch-requests"),
    (["--port", "70000"], "--port must be in 0..65535"),
])
def test_flags_are_validated_in_one_line(tmp_path, capsys, extra, expect):
    argv = launch_args(tmp_path) + extra
    code, out, err = bench(argv, capsys)
    assert code == 2
    assert expect in error_line(err)
    assert not (tmp_path / "pids").exists()  # nothing was started


def test_missing_models_and_tokenizer(tmp_path, capsys):
    code, _, err = bench(["--dataset-name", "builtin-math", "--target-model", "x",
                          "--no-chat-template"], capsys)
    assert code == 2 and "--draft-model is required" in error_line(err)
    argv = [a for a in launch_args(tmp_path) if a != "--no-chat-template"]
    code, _, err = bench(argv + ["--tokenizer", tmp_path / "no-tokenizer"], capsys)
    assert code == 2
    line = error_line(err)
    assert "does not exist" in line and "--no-chat-template" in line
    assert not (tmp_path / "pids").exists()


def test_port_in_use_is_one_line(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        argv = launch_args(tmp_path)
        argv[argv.index("--port") + 1] = str(port)
        code, _, err = bench(argv, capsys)
    assert code == 2
    line = error_line(err)
    assert f"port {port} on 127.0.0.1 is already in use" in line and "--port" in line
    assert not (tmp_path / "pids").exists()


def test_backend_filter_by_compute_capability():
    gpu = lambda sm: serving.GpuInfo(True, name="gpu", sm=sm, count=1)  # noqa: E731
    backends = ["flashinfer", "fa3", "fa4"]
    assert serving.filter_backends(backends, gpu(90))[0] == ["flashinfer", "fa3"]
    assert serving.filter_backends(backends, gpu(100))[0] == ["flashinfer", "fa4"]
    kept, notes = serving.filter_backends(backends, gpu(80))
    assert kept == ["flashinfer"] and len(notes) == 2 and "fa3 needs SM 90" in notes[0]
    assert serving.filter_backends(backends, None)[0] == backends


def test_read_meta_across_releases():
    m = serving.read_meta({"completion_tokens": 12, "prompt_tokens": 5, "spec_verify_ct": 4,
                           "spec_accept_length": 3.0, "spec_accepted_drafts": 8,
                           "spec_proposed_drafts": 60}, 1.0, None)
    assert (m.accept_length, m.accept_source, m.accepted_drafts) == (3.0, "spec_accept_length", 8)
    m = serving.read_meta({"completion_tokens": 12, "spec_verify_ct": 5,
                           "spec_num_correct_drafts": 7, "spec_num_proposed_drafts": 75},
                          1.0, None)
    assert m.accept_length == pytest.approx(2.4)
    assert m.accept_source == "completion_tokens/spec_verify_ct"
    assert (m.accepted_drafts, m.proposed_drafts) == (7, 75)
    m = serving.read_meta({"completion_tokens": 12}, 1.0, None)
    assert m.accept_length is None and m.verify_ct is None
    with pytest.raises(serving.RequestFailed):
        serving.read_meta({"text": "x"}, 1.0, None)


def test_percentiles_and_summary():
    assert serving.percentile([3, 1, 2, 4], 0.5) == 2.5
    assert serving.percentile([1, 2, 3, 4, 5], 0.99) == pytest.approx(4.96)
    runs = [serving.RequestResult(latency=0.5, completion_tokens=10, prompt_tokens=3, ttft=0.1,
                                  accept_length=2.0, verify_ct=5),
            serving.RequestResult(latency=1.5, completion_tokens=30, prompt_tokens=4, ttft=0.3,
                                  accept_length=3.0, verify_ct=10)]
    m, warnings = serving.summarize(serving.LoadRun(runs, 2.0, 2), "dflash")
    assert m["output_throughput"] == 20.0 and m["request_throughput"] == 1.0
    assert m["mean_e2e_latency_ms"] == pytest.approx(1000.0)
    assert m["accept_length"] == 2.5 and m["accept_length_token_weighted"] == pytest.approx(40 / 15)
    assert m["mean_tpot_ms"] == pytest.approx((0.4 / 9 + 1.2 / 29) / 2 * 1000)
    assert warnings == []


@pytest.mark.slow
def test_chat_template_applied_client_side(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                          "{% endfor %}<|assistant|>think={{ enable_thinking }}")
    fast.save_pretrained(tmp_path / "tok")
    with FakeServer(["--port", "0", "--fake-latency-s", "0.01"]) as fake:
        argv = [a for a in common(tmp_path, concurrencies="1", base=1)
                if a != "--no-chat-template"]
        code, _, err = bench(argv + ["--base-url", fake.url, "--tokenizer", tmp_path / "tok"],
                             capsys)
        assert code == 0, err
        prompts = fake.state.stats()["prompts_seen"]
    assert prompts and all(p.startswith("<|user|>") and p.endswith("<|assistant|>think=False")
                           for p in prompts)


# ----------------------------------------------------------------------------- top-p / top-k

@pytest.mark.parametrize("extra, sent", [
    ([], {"temperature": 0.0, "top_p": 1.0, "top_k": 1}),                 # greedy, as before
    (["--temperature", "0.7", "--top-p", "0.9", "--top-k", "20"],
     {"temperature": 0.7, "top_p": 0.9, "top_k": 20}),
    (["--temperature", "1.0"], {"temperature": 1.0}),                      # off: left out
])
def test_top_p_top_k_arrive_in_sampling_params_and_are_recorded(tmp_path, capsys, extra, sent):
    with FakeServer(["--port", "0", "--fake-latency-s", "0.01"]) as fake:
        code, out, err = bench(common(tmp_path, concurrencies="1", base=1, max_new=8)
                               + ["--base-url", fake.url, *extra], capsys)
        assert code == 0, err
        epochs = fake.state.stats()["epochs"]
    assert epochs and all(ep["sampling"] == [sent] for ep in epochs), epochs
    report = json.loads((tmp_path / "r.json").read_text())
    settings = report["settings"]
    assert (settings["top_p"], settings["top_k"]) == (sent.get("top_p", 1.0) if extra else 1.0,
                                                      sent.get("top_k", 0) if extra else 0)
    assert "| top_p |" in (tmp_path / "r.md").read_text()
    header = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    assert header["identity"]["top_p"] == settings["top_p"]


def test_resume_of_a_log_from_before_top_p_top_k(tmp_path, capsys):
    """A log whose identity has no top_p / top_k was recorded with them off."""
    argv = common(tmp_path, concurrencies="1", base=1, max_new=8)
    with FakeServer(["--port", "0", "--fake-latency-s", "0.01"]) as fake:
        assert bench(argv + ["--base-url", fake.url], capsys)[0] == 0
        log = tmp_path / "r.jsonl"
        lines = log.read_text().splitlines()
        header = json.loads(lines[0])
        del header["identity"]["top_p"], header["identity"]["top_k"]
        log.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
        code, out, err = bench(argv + ["--base-url", fake.url, "--resume"], capsys)
        assert code == 0, err
        code, out, err = bench(argv + ["--base-url", fake.url, "--resume", "--temperature",
                                       "0.5", "--top-k", "5"], capsys)
    assert code == 2 and "top_k: 0 there, 5 now" in error_line(err)


@pytest.mark.parametrize("extra, expect", [
    (["--top-p", "0"], "--top-p must be in (0, 1] (1 = off), got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0 (0 = off), got -1"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
])
def test_bad_sampling_flags_before_any_server_starts(tmp_path, capsys, extra, expect):
    code, out, err = bench(launch_args(tmp_path) + extra, capsys)
    assert code == 2 and expect in error_line(err)
    assert not (tmp_path / "pids").exists()
