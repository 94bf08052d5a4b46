#!/usr/bin/env python
"""TEST DOUBLE - NOT SGLang. A tiny stand-in for an SGLang server, for CPU tests only.

It speaks the part of SGLang's HTTP protocol that ``dflash/serving/`` uses (see
/work/shared/reference/sglang-api.md): ``GET /health_generate``, ``GET /health``,
``POST /generate`` (one prompt or a batched ``text`` list, optional ``stream``), ``GET|POST
/flush_cache``, ``GET /server_info`` and ``GET /get_server_info``. Responses carry ``meta_info``
with ``completion_tokens``, ``prompt_tokens``, ``e2e_latency`` and, in speculative mode,
``spec_verify_ct``, ``spec_accept_length``, ``spec_accept_rate`` and the draft counters under the
0.5.11 or the 0.5.23 names. No model runs: the "generated" text is filler, token counts and
acceptance lengths are derived deterministically from the prompt, and the latency is a sleep.

Test-only endpoints: ``GET /fake/stats`` (per-epoch records; an epoch ends at each flush) and
``POST /fake/reset``. Fault injection: ``--fake-never-ready``, ``--fake-ready-after-s``,
``--fake-fail-requests`` (HTTP 500), ``--fake-drop-requests`` (connection closed without an
answer), ``--fake-omit-fields`` (e.g. ``spec_accept_length``).

Run it as a process with the flags sglang's ``launch_server`` gets; unknown flags are accepted
and ignored, ``--host``/``--port``/``--speculative-algorithm``/``--attention-backend`` are
honoured. It binds to 127.0.0.1 unless told otherwise and uses only the standard library.
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
    p = argparse.ArgumentParser(description="TEST DOUBLE of an SGLang server (no model).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model-path", default="fake/model")
    p.add_argument("--speculative-algorithm", default=None)
    p.add_argument("--speculative-draft-model-path", default=None)
    p.add_argument("--speculative-num-draft-tokens", type=int, default=None)
    p.add_argument("--attention-backend", default=None)
    # fake-only knobs
    p.add_argument("--fake-latency-s", type=float, default=0.02, help="fixed time per request")
    p.add_argument("--fake-token-latency-s", type=float, default=0.0002,
                   help="time per target forward (per token, or per verify step when speculative)")
    p.add_argument("--fake-accept-length", type=float, default=3.0,
                   help="mean acceptance length in speculative mode")
    p.add_argument("--fake-field-style", choices=["0.5.11", "0.5.23"], default="0.5.11")
    p.add_argument("--fake-never-ready", action="store_true")
    p.add_argument("--fake-ready-after-s", type=float, default=0.0)
    p.add_argument("--fake-fail-requests", type=_ids, default=[],
                   help="1-based numbers of /generate requests answered with HTTP 500")
    p.add_argument("--fake-drop-requests", type=_ids, default=[],
                   help="1-based numbers of /generate requests whose connection is dropped")
    p.add_argument("--fake-omit-fields", default="",
                   help="comma-separated meta_info fields never sent")
    p.add_argument("--fake-pid-dir", default=None, help="write <pid>.pid files here")
    p.add_argument("--fake-spawn-child", action="store_true",
                   help="start a sleeping child process (like sglang's scheduler processes)")
    p.add_argument("--fake-ignore-sigterm", action="store_true")
    args, _unknown = p.parse_known_args(argv)  # accept and ignore sglang's other flags
    args.fake_omit_fields = {f for f in args.fake_omit_fields.split(",") if f}
    return args


class FakeState:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.speculative = bool(args.speculative_algorithm)
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.generate_count = 0
            self.inflight_requests = 0
            self.inflight_sequences = 0
            self.max_inflight_requests = 0
            self.max_inflight_sequences = 0
            self.flush_count = 0
            self.prompts_seen: list[str] = []
            self.epochs = [self._new_epoch()]

    @staticmethod
    def _new_epoch() -> dict:
        return {"requests": 0, "sequences": 0, "max_inflight_requests": 0,
                "max_inflight_sequences": 0, "inflight_requests": 0, "inflight_sequences": 0,
                "completion_tokens": 0, "prompt_tokens": 0, "accept_lengths": [],
                "sampling": []}

    def note_sampling(self, ep: dict, params: dict) -> None:
        """The distinct sampling fields of an epoch's requests (tests check what arrived)."""
        fields = {k: v for k, v in params.items() if k != "max_new_tokens"}
        with self.lock:
            if fields not in ep["sampling"]:
                ep["sampling"].append(fields)

    def ready(self) -> bool:
        if self.args.fake_never_ready:
            return False
        return time.monotonic() - self.started >= self.args.fake_ready_after_s

    def begin(self, prompts: list[str]) -> tuple[int, dict]:
        n_seq = len(prompts)
        with self.lock:
            self.generate_count += 1
            self.prompts_seen.extend(prompts[:max(0, 50 - len(self.prompts_seen))])
            ep = self.epochs[-1]
            self.inflight_requests += 1
            self.inflight_sequences += n_seq
            ep["inflight_requests"] += 1
            ep["inflight_sequences"] += n_seq
            ep["requests"] += 1
            ep["sequences"] += n_seq
            self.max_inflight_requests = max(self.max_inflight_requests, self.inflight_requests)
            self.max_inflight_sequences = max(self.max_inflight_sequences,
                                              self.inflight_sequences)
            ep["max_inflight_requests"] = max(ep["max_inflight_requests"],
                                              ep["inflight_requests"])
            ep["max_inflight_sequences"] = max(ep["max_inflight_sequences"],
                                               ep["inflight_sequences"])
            return self.generate_count, ep

    def end(self, ep: dict, n_seq: int, metas: list[dict] | None) -> None:
        with self.lock:
            self.inflight_requests -= 1
            self.inflight_sequences -= n_seq
            ep["inflight_requests"] -= 1
            ep["inflight_sequences"] -= n_seq
            for meta in metas or []:
                ep["completion_tokens"] += meta["completion_tokens"]
                ep["prompt_tokens"] += meta["prompt_tokens"]
                if "spec_accept_length" in meta:
                    ep["accept_lengths"].append(meta["spec_accept_length"])

    def flush(self) -> None:
        with self.lock:
            self.flush_count += 1
            if self.epochs[-1]["requests"]:
                self.epochs.append(self._new_epoch())

    def stats(self) -> dict:
        with self.lock:
            return {"generate_count": self.generate_count,
                    "max_inflight_requests": self.max_inflight_requests,
                    "max_inflight_sequences": self.max_inflight_sequences,
                    "flush_count": self.flush_count,
                    "speculative": self.speculative,
                    "prompts_seen": list(self.prompts_seen),
                    "epochs": [dict(e, accept_lengths=list(e["accept_lengths"]),
                                    sampling=list(e["sampling"]))
                               for e in self.epochs if e["requests"]]}

    def make_meta(self, prompt: str, max_new_tokens: int) -> tuple[dict, float]:
        """meta_info for one prompt, and the simulated compute time."""
        digest = int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16)
        completion = max(1, max_new_tokens - digest % 5)
        prompt_tokens = max(1, len(prompt.split()))
        meta = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "cached_tokens": 0, "finish_reason": {"type": "length", "length": completion}}
        steps = completion
        if self.speculative:
            target = max(1.0, self.args.fake_accept_length + ((digest >> 8) % 3 - 1) * 0.5)
            steps = max(1, math.ceil(completion / target))
            accept_len = completion / steps
            proposed = steps * max(1, (self.args.speculative_num_draft_tokens or 16) - 1)
            correct = completion - steps
            names = (("spec_accepted_drafts", "spec_proposed_drafts", "spec_accept_histogram")
                     if self.args.fake_field_style == "0.5.11" else
                     ("spec_num_correct_drafts", "spec_num_proposed_drafts",
                      "spec_correct_drafts_histogram"))
            meta.update({"spec_verify_ct": steps, "spec_accept_length": accept_len,
                         "spec_accept_rate": correct / proposed if proposed else 0.0,
                         names[0]: correct, names[1]: proposed, names[2]: [0, steps]})
        for field in self.args.fake_omit_fields:
            meta.pop(field, None)
        return meta, self.args.fake_latency_s + steps * self.args.fake_token_latency_s


def make_handler(state: FakeState):
    class Handler(BaseHTTPRequestHandler):
        server_version = "FakeSGLang/0 (test double)"

        def log_message(self, fmt, *a):  # keep test output quiet
            pass

        def _send(self, code: int, payload) -> None:
            body = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> dict:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b"{}"
            return json.loads(raw or b"{}")

        def do_GET(self):
            path = urlparse(self.path).path
            if path in ("/health", "/health_generate"):
                if state.ready():
                    self._send(200, "")
                else:
                    self._send(503, {"error": "not ready (test double)"})
            elif path == "/flush_cache":
                state.flush()
                self._send(200, "Cache flushed.")
            elif path in ("/server_info", "/get_server_info"):
                self._send(200, {
                    "model_path": state.args.model_path,
                    "speculative_algorithm": state.args.speculative_algorithm,
                    "speculative_num_draft_tokens": state.args.speculative_num_draft_tokens,
                    "attention_backend": state.args.attention_backend,
                    "version": "0.0.0-fake",
                    "internal_states": [{"avg_spec_accept_length":
                                         state.args.fake_accept_length if state.speculative
                                         else None,
                                         "last_gen_throughput": 0.0}]})
            elif path == "/fake/stats":
                self._send(200, state.stats())
            else:
                self._send(404, {"error": f"no route {path}"})

        def do_POST(self):
            path = urlparse(self.path).path
            if path == "/flush_cache":
                state.flush()
                self._send(200, "Cache flushed.")
            elif path == "/fake/reset":
                state.reset()
                self._send(200, {"ok": True})
            elif path == "/generate":
                self._generate()
            else:
                self._send(404, {"error": f"no route {path}"})

        def _generate(self):
            body = self._body()
            text = body.get("text")
            batched = isinstance(text, list)
            prompts = text if batched else [text]
            if not prompts or not all(isinstance(t, str) for t in prompts):
                self._send(400, {"error": "text must be a string or a list of strings"})
                return
            params = body.get("sampling_params") or {}
            max_new = int(params.get("max_new_tokens") or 128)
            number, epoch = state.begin(prompts)
            state.note_sampling(epoch, params)
            metas = None
            try:
                if number in state.args.fake_drop_requests:
                    time.sleep(state.args.fake_latency_s)
                    self.close_connection = True
                    return  # nothing written: the client sees the connection closed
                if number in state.args.fake_fail_requests:
                    time.sleep(state.args.fake_latency_s)
                    state.end(epoch, len(prompts), None)
                    epoch = None
                    self._send(500, {"error": {"message": "injected failure (test double)"}})
                    return
                t0 = time.monotonic()
                made = [state.make_meta(p, max_new) for p in prompts]
                metas = [m for m, _ in made]
                delay = max(d for _, d in made)
                if body.get("stream") and not batched:
                    self._stream(metas[0], delay, t0, epoch)
                    epoch = None
                    return
                time.sleep(delay)
                out = []
                for meta in metas:
                    meta["e2e_latency"] = time.monotonic() - t0
                    out.append({"text": " tok" * meta["completion_tokens"], "meta_info": meta})
                # the request is over for the server before the answer reaches the client, so a
                # client that sends its next request right away is never counted twice
                state.end(epoch, len(prompts), metas)
                epoch = None
                self._send(200, out if batched else out[0])
            finally:
                if epoch is not None:
                    state.end(epoch, len(prompts), metas)

        def _stream(self, meta: dict, delay: float, t0: float, epoch: dict) -> None:
            total = meta["completion_tokens"]
            chunks = min(4, total)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.close_connection = True
            for i in range(1, chunks + 1):
                time.sleep(delay / chunks)
                partial = dict(meta, completion_tokens=total * i // chunks)
                partial["e2e_latency"] = time.monotonic() - t0
                if i == chunks:
                    state.end(epoch, 1, [meta])
                line = json.dumps({"text": " tok" * partial["completion_tokens"],
                                   "meta_info": partial, "index": 0})
                self.wfile.write(f"data: {line}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


class FakeServer:
    """In-process handle (for tests that want the stats without a subprocess)."""

    def __init__(self, argv: list[str] | None = None):
        self.args = parse_args(argv or ["--port", "0"])
        self.state = FakeState(self.args)
        self.httpd = ThreadingHTTPServer((self.args.host, self.args.port), make_handler(self.state))
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
    httpd = ThreadingHTTPServer((args.host, args.port), make_handler(state))
    httpd.daemon_threads = True
    print(f"fake sglang server (TEST DOUBLE) on http://{args.host}:{httpd.server_address[1]} "
          f"speculative={state.speculative}", flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
