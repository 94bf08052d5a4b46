"""benchmark_sglang.py --engine vllm|openai against the vLLM / llama.cpp test doubles, on CPU.

Every server here is tests/serving/fake_openai_server.py (a test double) on 127.0.0.1, started
in-process or through the launch path; every request loop is bounded.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

from dflash.serving import prometheus
from dflash.serving import sglang as serving
from tests.serving.fake_openai_server import FakeServer
from tests.serving.test_sglang_bench import (REPO, SEED_ARGS, bench, common, error_line,
                                             live_pids, md_table, run_cli_process)

FAKE = REPO / "tests" / "serving" / "fake_openai_server.py"


def spec_config(k: int = 7) -> list[str]:
    return ["--speculative-config",
            json.dumps({"method": "dflash", "model": "fake/draft", "num_speculative_tokens": k})]


def vllm_launch_args(tmp_path, *fake_extra, **kw):
    cmd = " ".join([sys.executable, str(FAKE), "--fake-latency-s", "0.03", "--fake-pid-dir",
                    str(tmp_path / "pids"), *map(str, fake_extra)])
    return common(tmp_path, **kw) + ["--engine", "vllm", "--port", "0", "--stop-grace-s", "5",
                                      "--server-cmd", cmd]


# ----------------------------------------------------------------------------- (1) --base-url

def test_vllm_base_url_concurrency_tokens_and_acceptance_from_metrics(tmp_path, capsys):
    concs, base = [1, 3, 4], 2
    argv = common(tmp_path, concurrencies="1,3,4", base=base, max_new=40) + ["--engine", "vllm"]
    seen = {}
    for mode, extra in (("baseline", []),
                        ("dflash", spec_config(7) + ["--fake-accept-length", "3.5",
                                                     "--fake-metrics-start", "1234",
                                                     "--fake-engines", "2"])):
        with FakeServer(["--port", "0", "--fake-latency-s", "0.03", *extra]) as fake:
            code, out, err = bench(argv + ["--base-url", fake.url, "--resume"], capsys)
            assert code == 0, err
            seen[mode] = fake.state.stats()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "complete" and report["engine"] == "vllm"
    recs = {(r["mode"], r["concurrency"]): r for r in report["results"]}
    for mode, stats in seen.items():
        epochs = stats["epochs"]  # one per /reset_prefix_cache: warm-up c1, timed c1, ...
        # the dflash server also answered the one probe request before its first reset
        timed_epochs = epochs[-2 * len(concs):]
        for k, c in enumerate(concs):
            warm, timed = timed_epochs[2 * k], timed_epochs[2 * k + 1]
            n = min(base * c, 64)
            assert warm["requests"] == c and warm["max_inflight"] == c
            assert timed["requests"] == n and timed["max_inflight"] == c
            rec = recs[(mode, c)]
            assert rec["engine"] == "vllm" and rec["completed"] == n and rec["max_inflight"] == c
            assert rec["total_output_tokens"] == timed["completion_tokens"]
            assert rec["total_input_tokens"] == timed["prompt_tokens"]
            assert rec["mean_ttft_ms"] is None  # not streamed
            if mode == "dflash":
                assert rec["accept_length"] == pytest.approx(
                    1 + timed["accepted"] / timed["drafts"], rel=1e-12)
                rates = rec["accept_rate_per_position"]
                assert len(rates) == 7 and rates == sorted(rates, reverse=True)
                assert sum(rates) * timed["drafts"] == pytest.approx(timed["accepted"])
                assert rec["spec_counters_delta"]["drafts"] == timed["drafts"]
            else:
                assert rec["accept_length"] is None
    assert seen["dflash"]["counters"]["drafts"] > 1234  # the deltas ignored the start value
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("# vLLM DFlash throughput benchmark")
    rows = md_table(md, "external")
    for j, c in enumerate(concs):
        assert rows["acceptance length"][j] == f"{recs[('dflash', c)]['accept_length']:.2f}"
        assert rows["baseline tok/s"][j] == f"{recs[('baseline', c)]['output_throughput']:.1f}"


def test_vllm_stream_gives_ttft_and_tpot_from_the_stream(tmp_path, capsys):
    with FakeServer(["--port", "0", "--fake-latency-s", "0.04", "--fake-ttft-s", "0.15",
                     *spec_config(5)]) as fake:
        code, _, err = bench(common(tmp_path, concurrencies="2", max_new=30) +
                             ["--engine", "vllm", "--base-url", fake.url, "--stream"], capsys)
        assert code == 0, err
        timed = fake.state.stats()["epochs"][-1]
    rec = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert rec["total_output_tokens"] == timed["completion_tokens"]  # from the last chunk's usage
    assert 150 <= rec["mean_ttft_ms"] < rec["mean_e2e_latency_ms"]
    # three more chunks after the first, 0.01 s apart, over ~29 more tokens
    assert 0 < rec["mean_tpot_ms"] < (rec["mean_e2e_latency_ms"] - 150) / 20
    assert rec["accept_length"] == pytest.approx(1 + timed["accepted"] / timed["drafts"])


# ----------------------------------------------------------------------------- (2) --engine openai

@pytest.mark.parametrize("flavor", ["vllm", "llamacpp"])
def test_openai_engine_reports_throughput_and_latency(tmp_path, capsys, flavor):
    extra = spec_config(3) if flavor == "vllm" else []
    with FakeServer(["--port", "0", "--fake-flavor", flavor, *extra]) as fake:
        code, out, err = bench(common(tmp_path, concurrencies="1,2") +
                               ["--engine", "openai", "--base-url", fake.url, "--stream"], capsys)
        assert code == 0, err
        stats = fake.state.stats()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "complete" and report["engine"] == "openai"
    for rec in report["results"]:
        assert rec["output_throughput"] > 0 and rec["median_e2e_latency_ms"] > 0
        assert rec["mean_ttft_ms"] is not None
        assert rec["max_inflight"] == rec["concurrency"]
    assert stats["max_inflight_requests"] <= 2
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("# OpenAI-compatible server DFlash throughput benchmark")
    if flavor == "llamacpp":  # llamacpp: counters are unknown here: a baseline, said so
        assert "no speculative-decoding counters" in out
        assert all(r["mode"] == "baseline" and r["accept_length"] is None
                   for r in report["results"])
    else:
        assert all(r["mode"] == "dflash" and r["accept_length"] > 1 for r in report["results"])


def test_log_comparing_engines_gets_an_engine_column(tmp_path, capsys):
    with FakeServer(["--port", "0", *spec_config(3)]) as fake:
        argv = common(tmp_path, concurrencies="1") + ["--base-url", fake.url]
        assert bench(argv + ["--engine", "vllm"], capsys)[0] == 0
        code, _, err = bench(argv + ["--engine", "openai", "--resume"], capsys)
        assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["engines"] == ["openai", "vllm"]
    md = (tmp_path / "r.md").read_text()
    assert "## vLLM, attention backend: external" in md
    assert "## OpenAI-compatible server, attention backend: external" in md
    assert "| engine | mode | c |" in md and "| vllm | DFLASH | 1 |" in md


# ----------------------------------------------------------------------------- launch path

def test_vllm_launch_path_runs_baseline_then_dflash(tmp_path, capsys):
    argv = vllm_launch_args(tmp_path, concurrencies="1,2") + ["--block-size", "8", "--stream"]
    code, out, err = bench(argv, capsys)
    assert code == 0, err
    assert re.findall(r"\[vllm (\w+)\] launching the (\w+) server", out) == \
        [("auto", "baseline"), ("auto", "DFLASH")]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "complete"
    spec = '{"method": "dflash", "model": "fake/draft", "num_speculative_tokens": 7}'
    for r in report["results"]:
        assert r["server_cmd"].split()[:3] == [sys.executable, str(FAKE), "--fake-latency-s"]
        assert "fake/target" in r["server_cmd"] and "--max-num-seqs 64" in r["server_cmd"]
        assert (spec in r["server_cmd"]) == (r["mode"] == "dflash")
        assert (r["accept_length"] is not None) == (r["mode"] == "dflash")
        assert r["mean_ttft_ms"] is not None
        assert (tmp_path / "r_logs" / f"server_vllm_auto_{r['mode']}.log").exists()
    pids = list((tmp_path / "pids").glob("*.pid"))
    assert len(pids) == 2 and live_pids(tmp_path / "pids") == []


# ----------------------------------------------------------------------------- (3) faults

def test_vllm_server_never_ready(tmp_path, capsys):
    code, _, err = bench(vllm_launch_args(tmp_path, "--fake-never-ready") +
                         ["--timeout-s", "1.5"], capsys)
    assert code != 0
    line = error_line(err)
    assert "not ready after 1.5 s" in line and "/health HTTP 503" in line and "log:" in line
    assert live_pids(tmp_path / "pids") == []


@pytest.mark.parametrize("fault,expect", [
    ("--fake-fail-requests", "HTTP 500"),
    ("--fake-drop-requests", "connection dropped by the server"),
])
def test_vllm_request_fault_keeps_finished_configurations(tmp_path, capsys, fault, expect):
    # per server: c=1 warm-up (request 1) + 2 timed (2-3); c=2 warm-up (4-5) + timed (6-9)
    code, _, err = bench(vllm_launch_args(tmp_path, fault, "7", "--fake-spawn-child"), capsys)
    assert code != 0
    line = error_line(err)
    assert "baseline vllm auto c=2: request" in line and expect in line
    assert "1 configuration(s) kept" in line and "--resume" in line
    recs = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["concurrency"]) for r in recs[1:]] == [("baseline", 1)]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "failed" and expect in report["error"]
    assert len(list((tmp_path / "pids").glob("*.pid"))) == 2
    assert live_pids(tmp_path / "pids") == []


def test_vllm_missing_counters_is_na_with_one_warning(tmp_path, capsys):
    code, _, err = bench(vllm_launch_args(tmp_path, "--fake-omit-metrics", concurrencies="1")
                         + ["--skip-baseline"], capsys)
    assert code == 0, err
    warn = [l for l in err.splitlines() if l.startswith("warning:")]
    assert len(warn) == 1 and "acceptance length reported as n/a" in warn[0]
    assert "/metrics" in warn[0]
    rows = md_table((tmp_path / "r.md").read_text(), "auto")
    assert rows["acceptance length"] == ["n/a"] and rows["DFLASH tok/s"][0] != "n/a"
    assert live_pids(tmp_path / "pids") == []


def test_vllm_missing_usage_is_one_line(tmp_path, capsys):
    with FakeServer(["--port", "0", "--fake-omit-usage"]) as fake:
        code, _, err = bench(common(tmp_path, concurrencies="1") +
                             ["--engine", "vllm", "--base-url", fake.url], capsys)
    assert code == 1
    line = error_line(err)
    assert "first request failed" in line and "no usage" in line
    assert not (tmp_path / "r.jsonl").exists()


# ----------------------------------------------------------------------------- (4) the seed

def _vllm_gpu_box() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch
    return torch.cuda.is_available()


def test_vllm_seed_dry_run_prints_exact_launch_commands(tmp_path):
    res = run_cli_process([*SEED_ARGS, "--engine", "vllm", "--dry-run"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    beside = Path(sys.executable).parent / "vllm"
    vllm = str(beside) if beside.exists() else "vllm"
    env = "VLLM_SERVER_DEV_MODE=" + os.environ.get("VLLM_SERVER_DEV_MODE", "1")
    tail = ("--tensor-parallel-size 1 --dtype bfloat16 --gpu-memory-utilization 0.75 "
            "--max-num-seqs 64 --seed 0 --trust-remote-code --host 127.0.0.1 --port 30000")
    spec = ("'{\"method\": \"dflash\", \"model\": \"z-lab/Qwen3-4B-DFlash-b16\", "
            "\"num_speculative_tokens\": 15}'")
    lines = res.stdout.splitlines()
    assert f"{env} {vllm} serve Qwen/Qwen3-4B {tail}" in lines
    assert f"{env} {vllm} serve Qwen/Qwen3-4B --speculative-config {spec} {tail}" in lines
    assert "c=1: 8, c=2: 16, c=4: 32" in res.stdout
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(_vllm_gpu_box(), reason="this box could really launch vLLM")
def test_vllm_seed_on_cpu_fails_in_one_line(tmp_path):
    res = run_cli_process([*SEED_ARGS, "--engine", "vllm"], cwd=tmp_path)
    assert res.returncode != 0 and res.stdout == ""
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert err[0].startswith("benchmark_sglang.py: error: vLLM needs a CUDA GPU")
    assert "requirements-vllm.txt" in err[0]
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- flags, units

@pytest.mark.parametrize("extra,expect", [
    (["--engine", "vllm", "--attention-backends", "fa4"], "fa4 has no vLLM equivalent"),
    (["--engine", "vllm", "--batch-requests"], "--batch-requests has no equivalent"),
    (["--engine", "openai"], "--engine openai benchmarks a running server: pass --base-url"),
    (["--engine", "trtllm"], "invalid choice: 'trtllm'"),
])
def test_engine_flags_are_refused_in_one_line(tmp_path, capsys, extra, expect):
    code, _, err = bench(vllm_launch_args(tmp_path)[:-2] + extra, capsys)
    assert code == 2 and expect in error_line(err)
    assert not (tmp_path / "pids").exists()


def test_prometheus_counters_labels_created_and_deltas():
    def text(drafts, acc, pos):
        out = ["# HELP vllm:spec_decode_num_drafts Number of drafts.",
               "# TYPE vllm:spec_decode_num_drafts counter"]
        for eng in ("0", "1"):
            out += [f'vllm:spec_decode_num_drafts_total{{engine="{eng}",model_name="m,\\"x\\""}} '
                    f"{drafts / 2}",
                    f'vllm:spec_decode_num_drafts_created{{engine="{eng}"}} 1.7e9',
                    f'vllm:spec_decode_num_accepted_tokens_total{{engine="{eng}"}} {acc / 2}',
                    f'vllm:spec_decode_num_draft_tokens_total{{engine="{eng}"}} {drafts * 2}']
            out += [f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine="{eng}",'
                    f'position="{k}"}} {v / 2}' for k, v in enumerate(pos)]
        out.append("vllm:other_total 5")
        return "\n".join(out)

    before = prometheus.spec_counters(text(100, 150, [80, 50, 20]))
    after = prometheus.spec_counters(text(140, 230, [112, 82, 36]))
    assert before["drafts"] == 100 and before["accepted"] == 150
    d = prometheus.acceptance_delta(before, after)
    assert d["accept_length"] == pytest.approx(1 + 80 / 40)
    assert d["accept_rate_per_position"] == pytest.approx([32 / 40, 32 / 40, 16 / 40])
    assert d["draft_accept_rate"] == pytest.approx(80 / (4 * 40))
    assert prometheus.spec_counters("llamacpp:tokens_predicted_total 9\n") is None
    assert prometheus.acceptance_delta(before, before) is None  # nothing drafted in between


def test_serving_needs_no_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import dflash.serving.sglang, dflash.serving.run\n")
    import subprocess
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_per_request_time_limit_is_one_line(tmp_path, capsys):
    with FakeServer(["--port", "0", "--fake-latency-s", "3"]) as fake:
        code, _, err = bench(common(tmp_path, concurrencies="1") +
                             ["--engine", "openai", "--base-url", fake.url, "--timeout-s", "0.5"],
                             capsys)
    assert code == 1
    line = error_line(err)
    assert "first request failed" in line and "no answer within 0.5 s" in line


# ----------------------------------------------------------------------------- top-p / top-k

@pytest.mark.parametrize("engine, flavor, extra, sent", [
    ("vllm", "vllm", [], {"temperature": 0.0, "top_p": 1.0, "top_k": 1}),
    ("vllm", "vllm", ["--temperature", "0.6", "--top-p", "0.95", "--top-k", "40"],
     {"temperature": 0.6, "top_p": 0.95, "top_k": 40}),
    ("openai", "llamacpp", [], {"temperature": 0.0, "top_p": 1.0}),   # no top_k extension
    ("openai", "llamacpp", ["--temperature", "0.6", "--top-p", "0.8", "--top-k", "7"],
     {"temperature": 0.6, "top_p": 0.8, "top_k": 7}),
    ("openai", "llamacpp", ["--temperature", "0.6", "--top-k", "0"], {"temperature": 0.6}),
])
def test_top_p_top_k_arrive_in_openai_requests(tmp_path, capsys, engine, flavor, extra, sent):
    with FakeServer(["--port", "0", "--fake-latency-s", "0.01", "--fake-flavor", flavor]) as fake:
        code, out, err = bench(common(tmp_path, concurrencies="1", base=1, max_new=8)
                               + ["--engine", engine, "--base-url", fake.url, *extra], capsys)
        assert code == 0, err
        epochs = fake.state.stats()["epochs"]
    assert epochs and all(ep["sampling"] == [sent] for ep in epochs), epochs
    settings = json.loads((tmp_path / "r.json").read_text())["settings"]
    assert settings["top_p"] == sent.get("top_p", 1.0) and settings["top_k"] == \
        (sent.get("top_k", 0) if sent["temperature"] else 0)
