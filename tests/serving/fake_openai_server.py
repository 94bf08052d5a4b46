#!/usr/bin/env python
"""TEST DOUBLE - NOT vLLM, NOT llama.cpp. A tiny stand-in for an OpenAI-compatible server, for
CPU tests only. No model runs: the "generated" text is filler, token counts and acceptance are
derived deterministically from the prompt, and the latency is a sleep.

``--fake-flavor vllm`` (default) speaks the part of ``vllm serve`` that dflash/serving/ uses (see
/work/shared/reference/sglang-api.md): ``GET /health``, ``GET /v1/models``, ``POST
/v1/completions`` (``model`` must be the served name; ``stream`` with
``stream_options.include_usage``), ``POST /reset_prefix_cache`` and ``GET /metrics`` with
vLLM's speculative-decoding counters (``vllm:spec_decode_num_drafts_total``,
``..._num_draft_tokens_total``, ``..._num_accepted_tokens_total``,
``..._num_accepted_tokens_per_pos_total{position="k"}``) labelled by engine and model_name,
with ``_created`` samples beside them, starting at ``--fake-metrics-start`` (not zero).
``--fake-flavor llamacpp`` is llama-server: ``/health`` answers 503 while loading, no
``/reset_prefix_cache``, ``/metrics`` carries ``llamacpp:`` counters only.

Launched like ``vllm serve <model> --speculative-config '{json}' --host H --port P ...``:
unknown flags are accepted and ignored. Test-only endpoints: ``GET /fake/stats`` (per-epoch
records; an epoch ends at each cache reset). Fault injection: ``--fake-never-ready``,
``--fake-fail-requests`` (HTTP 500), ``--fake-drop-requests`` (connection closed without an
answer), ``--fake-omit-usage``, ``--fake-omit-metrics``. It binds to 127.0.0.1 unless told
otherwise, uses only the standard library, and exits by itself after ``--fake-lifetime-s``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


def _ids(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()] if text else []


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="TEST DOUBLE of vLLM / llama.cpp (no model).")
    p.add_argument("model", nargs="?", default="fake/model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--speculative-config", default=None)
    p.add_argument("--fake-flavor", choices=["vllm", "llamacpp"], default="vllm")
    p.add_argument("--fake-latency-s", type=float, default=0.02, help="fixed time per request")
    p.add_argument("--fake-ttft-s", type=float, default=0.0,
                   help="extra wait before the first streamed chunk")
    p.add_argument("--fake-accept-length", type=float, default=3.0)
    p.add_argument("--fake-metrics-start", type=int, default=0,
                   help="counters start here (a server that already served requests)")
    p.add_argument("--fake-engines", type=int, default=1,
                   help="counters split over this many engine labels")
    p.add_argument("--fake-never-ready", action="store_true")
    p.add_argument("--fake-fail-requests", type=_ids, default=[])
    p.add_argument("--fake-drop-requests", type=_ids, default=[])
    p.add_argument("--fake-omit-usage", action="store_true")
    p.add_argument("--fake-omit-metrics", action="store_true",
                   help="no speculative-decoding counters at /metrics")
    p.add_argument("--fake-pid-dir", default=None)
    p.add_argument("--fake-spawn-child", action="store_true")
    p.add_argument("--fake-ignore-sigterm", action="store_true")
    p.add_argument("--fake-lifetime-s", type=float, default=600.0)
    args, _unknown = p.parse_known_args(argv)
    spec = json.loads(args.speculative_config) if args.speculative_config else None
    args.spec_k = int(spec.get("num_speculative_tokens", 15)) if spec else 0
    if args.fake_flavor == "llamacpp" and args.model == "fake/model":
        args.model = "fake-llama.gguf"
    return args


class FakeState:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.lock = threading.Lock()
        self.speculative = args.spec_k > 0
        self.count = 0
        self.inflight = 0
        self.max_inflight = 0
        start = args.fake_metrics_start
        k = max(1, args.spec_k)
        self.counters = {"drafts": start, "draft_tokens": start * k,
                         "accepted": int(start * (args.fake_accept_length - 1)),
                         "per_pos": [max(0, start - j * start // (k + 1)) for j in range(k)]}
        self.epochs = [self._epoch()]

    @staticmethod
    def _epoch() -> dict:
        return {"requests": 0, "inflight": 0, "max_inflight": 0, "completion_tokens": 0,
                "prompt_tokens": 0, "drafts": 0, "accepted": 0, "sampling": []}

    def note_sampling(self, ep: dict, body: dict) -> None:
        """The distinct sampling fields of an epoch's requests (tests check what arrived)."""
        fields = {k: body[k] for k in ("temperature", "top_p", "top_k") if k in body}
        with self.lock:
            if fields not in ep["sampling"]:
                ep["sampling"].append(fields)

    def begin(self) -> tuple[int, dict]:
        with self.lock:
            self.count += 1
            ep = self.epochs[-1]
            ep["requests"] += 1
            ep["inflight"] += 1
            self.inflight += 1
            ep["max_inflight"] = max(ep["max_inflight"], ep["inflight"])
            self.max_inflight = max(self.max_inflight, self.inflight)
            return self.count, ep

    def end(self, ep: dict, done: dict | None) -> None:
        with self.lock:
            ep["inflight"] -= 1
            self.inflight -= 1
            if done:
                ep["completion_tokens"] += done["completion"]
                ep["prompt_tokens"] += done["prompt"]
                if self.speculative:
                    ep["drafts"] += done["steps"]
                    ep["accepted"] += done["accepted"]
                    c = self.counters
                    c["drafts"] += done["steps"]
                    c["draft_tokens"] += done["steps"] * self.args.spec_k
                    c["accepted"] += done["accepted"]
                    for j, n in enumerate(done["per_pos"]):
                        c["per_pos"][j] += n

    def reset(self) -> None:
        with self.lock:
            if self.epochs[-1]["requests"]:
                self.epochs.append(self._epoch())

    def stats(self) -> dict:
        with self.lock:
            return {"generate_count": self.count, "max_inflight_requests": self.max_inflight,
                    "speculative": self.speculative, "counters": json.loads(
                        json.dumps(self.counters)),
                    "epochs": [dict(e, sampling=list(e["sampling"])) for e in self.epochs
                               if e["requests"]]}

    def generate(self, prompt: str, max_tokens: int) -> tuple[dict, float]:
        digest = int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16)
        completion = max(1, max_tokens - digest % 5)
        done = {"completion": completion, "prompt": max(1, len(prompt.split())), "steps": 0,
                "accepted": 0, "per_pos": []}
        if self.speculative:
            k = self.args.spec_k
            target = min(k + 1.0, max(1.0, self.args.fake_accept_length
                                      + ((digest >> 8) % 3 - 1) * 0.5))
            steps = max(1, math.ceil(completion / target))
            accepted = min(completion - steps, steps * k)
            base, extra = divmod(accepted, steps)
            per_step = [base + (1 if i < extra else 0) for i in range(steps)]
            done.update(steps=steps, accepted=accepted,
                        per_pos=[sum(1 for a in per_step if a > j) for j in range(k)])
        return done, self.args.fake_latency_s

    def metrics_text(self) -> str:
        a = self.args
        model = a.model
        lines = []
        if a.fake_flavor == "llamacpp":
            with self.lock:
                total = sum(e["completion_tokens"] for e in self.epochs)
            return ("# HELP llamacpp:tokens_predicted_total Number of generation tokens.\n"
                    "# TYPE llamacpp:tokens_predicted_total counter\n"
                    f"llamacpp:tokens_predicted_total {total}\n"
                    "llamacpp:requests_processing 0\n")
        lines += ["# HELP vllm:num_requests_running Number of requests running.",
                  "# TYPE vllm:num_requests_running gauge",
                  f'vllm:num_requests_running{{engine="0",model_name="{model}"}} {self.inflight}']
        if not self.speculative or a.fake_omit_metrics:
            return "\n".join(lines) + "\n"
        with self.lock:
            c = json.loads(json.dumps(self.counters))
        n_eng = max(1, a.fake_engines)

        def split(value: float) -> list[float]:
            # the first engine label gets the remainder, so the sum over labels is exact
            share = [value // n_eng] * n_eng
            share[0] += value - sum(share)
            return share

        for key, family in (("drafts", "spec_decode_num_drafts"),
                            ("draft_tokens", "spec_decode_num_draft_tokens"),
                            ("accepted", "spec_decode_num_accepted_tokens")):
            lines += [f"# HELP vllm:{family} Counter (test double).",
                      f"# TYPE vllm:{family} counter"]
            for e, v in enumerate(split(c[key])):
                lab = f'engine="{e}",model_name="{model}"'
                lines.append(f"vllm:{family}_total{{{lab}}} {float(v)}")
                lines.append(f"vllm:{family}_created{{{lab}}} 1.7e+09")
        family = "spec_decode_num_accepted_tokens_per_pos"
        lines += [f"# TYPE vllm:{family} counter"]
        for j, total in enumerate(c["per_pos"]):
            for e, v in enumerate(split(total)):
                lab = f'engine="{e}",model_name="{model}",position="{j}"'
                lines.append(f"vllm:{family}_total{{{lab}}} {float(v)}")
                lines.append(f"vllm:{family}_created{{{lab}}} 1.7e+09")
        return "\n".join(lines) + "\n"


def make_handler(state: FakeState):
    a = state.args

    class Handler(BaseHTTPRequestHandler):
        server_version = f"Fake-{a.fake_flavor}/0 (test double)"

        def log_message(self, fmt, *args):  # keep test output quiet
            pass

        def _send(self, code: int, payload, ctype="application/json") -> None:
            body = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path = urlparse(self.path).path
            if path == "/health":
                if a.fake_never_ready:
                    self._send(503, {"error": {"message": "Loading model (test double)"}})
                else:
                    self._send(200, "" if a.fake_flavor == "vllm" else {"status": "ok"})
            elif path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": a.model, "object": "model"}]})
            elif path == "/metrics":
                self._send(200, state.metrics_text(), "text/plain; version=0.0.4")
            elif path == "/fake/stats":
                self._send(200, state.stats())
            else:
                self._send(404, {"error": f"no route {path}"})

        def do_POST(self):
            path = urlparse(self.path).path
            if path == "/reset_prefix_cache" and a.fake_flavor == "vllm":
                state.reset()
                self._send(200, "")
            elif path == "/v1/completions":
                self._complete()
            else:
                self._send(404, {"error": f"no route {path}"})

        def _complete(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n) or b"{}")
            if a.fake_flavor == "vllm" and body.get("model") != a.model:
                self._send(404, {"error": {"message": f"model {body.get('model')!r} not served"}})
                return
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                self._send(400, {"error": {"message": "prompt must be a string (test double)"}})
                return
            number, epoch = state.begin()
            state.note_sampling(epoch, body)
            done = None
            try:
                if number in a.fake_drop_requests:
                    time.sleep(a.fake_latency_s)
                    self.close_connection = True
                    return  # nothing written: the client sees the connection closed
                if number in a.fake_fail_requests:
                    time.sleep(a.fake_latency_s)
                    self._send(500, {"error": {"message": "injected failure (test double)"}})
                    return
                done, delay = state.generate(prompt, int(body.get("max_tokens") or 16))
                usage = {"prompt_tokens": done["prompt"], "completion_tokens": done["completion"],
                         "total_tokens": done["prompt"] + done["completion"]}
                if a.fake_omit_usage:
                    usage = None
                if body.get("stream"):
                    self._stream(done, usage, delay, epoch,
                                 bool((body.get("stream_options") or {}).get("include_usage")))
                    epoch = None
                    return
                time.sleep(delay)
                state.end(epoch, done)  # over for the server before the client sees it
                epoch = None
                out = {"id": f"cmpl-{number}", "object": "text_completion", "model": a.model,
                       "choices": [{"index": 0, "text": " tok" * done["completion"],
                                    "finish_reason": "length"}]}
                if usage is not None:
                    out["usage"] = usage
                self._send(200, out)
            finally:
                if epoch is not None:
                    state.end(epoch, None)

        def _stream(self, done, usage, delay, epoch, include_usage) -> None:
            total = done["completion"]
            chunks = min(4, total)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.close_connection = True
            time.sleep(a.fake_ttft_s)
            for i in range(chunks):
                if i:
                    time.sleep(delay / chunks)
                n_tok = total // chunks + (1 if i < total % chunks else 0)
                last = i == chunks - 1
                if last:
                    state.end(epoch, done)
                chunk = {"object": "text_completion", "model": a.model,
                         "choices": [{"index": 0, "text": " tok" * n_tok,
                                      "finish_reason": "length" if last else None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            if include_usage and usage is not None:
                self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                                 .encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


class QuietHTTPServer(ThreadingHTTPServer):
    """A client that gave up (a time limit) leaves a broken pipe: not worth a traceback."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass


class FakeServer:
    """In-process handle (for tests that want the stats without a subprocess)."""

    def __init__(self, argv: list[str] | None = None):
        self.args = parse_args(argv or ["--port", "0"])
        self.state = FakeState(self.args)
        self.httpd = QuietHTTPServer((self.args.host, self.args.port), make_handler(self.state))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{self.args.host}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FakeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fake_ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = None
    if args.fake_spawn_child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if args.fake_pid_dir:
        os.makedirs(args.fake_pid_dir, exist_ok=True)
        for pid in [os.getpid()] + ([child.pid] if child else []):
            with open(os.path.join(args.fake_pid_dir, f"{pid}.pid"), "w") as fh:
                fh.write(str(pid))
    state = FakeState(args)
    httpd = QuietHTTPServer((args.host, args.port), make_handler(state))
    httpd.daemon_threads = True
    # bounded: a double that nobody stops ends by itself
    timer = threading.Timer(args.fake_lifetime_s, httpd.shutdown)
    timer.daemon = True
    timer.start()
    print(f"fake {args.fake_flavor} server (TEST DOUBLE) on http://{args.host}:"
          f"{httpd.server_address[1]} speculative={state.speculative}", flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
