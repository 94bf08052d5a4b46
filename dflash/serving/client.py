"""HTTP client of the serving benchmark: readiness probes, cache flushes, /generate requests
(plain, batched, streamed) and the load generator that keeps exactly ``concurrency`` requests
in flight. Failures are one-line :class:`RequestFailed`; nothing is retried."""
from __future__ import annotations

import argparse
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Sequence

from ..errors import UserError

# ----------------------------------------------------------------------------- HTTP

class RequestFailed(Exception):
    """One request failed; the message is one line. ``unreachable``: no connection was made
    (refused, unknown host, no route, connect timeout, TLS failure), as opposed to a server
    that answered badly, dropped the connection or was slow."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


def _is_unreachable(err: BaseException) -> bool:
    """urllib wraps errors of opening the connection (and sending the request) in URLError;
    a slow or dropped answer is raised as is."""
    if not isinstance(err, urllib.error.URLError) or isinstance(err, urllib.error.HTTPError):
        return False
    return not isinstance(err.reason, (ConnectionResetError, BrokenPipeError,
                                       http.client.RemoteDisconnected))


def _opener_for(url: str) -> urllib.request.OpenerDirector:
    host = urllib.parse.urlparse(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def _describe_error(err: BaseException, timeout: float) -> str:
    if isinstance(err, urllib.error.HTTPError):
        try:
            body = err.read().decode("utf-8", "replace")
        except Exception:  # noqa: BLE001
            body = ""
        body = " ".join(body.split())[:200]
        return f"HTTP {err.code}" + (f": {body}" if body else "")
    if isinstance(err, (http.client.RemoteDisconnected, ConnectionResetError,
                        BrokenPipeError, http.client.IncompleteRead)):
        return f"connection dropped by the server ({type(err).__name__})"
    if isinstance(err, urllib.error.URLError):
        reason = err.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return f"no answer within {timeout:g} s"
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused (is the server running?)"
        if isinstance(reason, (ConnectionResetError, http.client.RemoteDisconnected)):
            return f"connection dropped by the server ({type(reason).__name__})"
        return f"cannot connect ({reason})"
    if isinstance(err, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g} s"
    return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"


def http_call(method: str, url: str, payload=None, timeout: float = 30.0) -> tuple[int, bytes]:
    """Send one request; returns (status, body) for any HTTP status; raises RequestFailed on
    transport errors (refused, dropped, timeout)."""
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with _opener_for(url).open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        try:
            body = err.read()
        except Exception:  # noqa: BLE001
            body = b""
        return err.code, body
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise RequestFailed(_describe_error(err, timeout), _is_unreachable(err)) from None


def check_reachable(base_url: str, wait_s: float, poll_s: float) -> None:
    """Something answers HTTP at ``base_url``: connections that cannot be made are retried
    for ``wait_s`` seconds, then refused in one line (exit 2). Any HTTP answer, or a slow
    one, counts as reachable: whether the server is ready is decided later, within
    --timeout-s."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            http_call("GET", base_url + "/health", timeout=10.0)
            return
        except RequestFailed as err:
            if not err.unreachable:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" for {wait_s:g} s" if wait_s > 0 else ""
                raise UserError(f"--base-url {base_url}: no server could be reached{waited} "
                                f"({err})",
                                "start the server first or fix the URL; --connect-wait-s N "
                                "waits longer for one that is still starting. Nothing was "
                                "run or written") from None
            time.sleep(min(poll_s, left))


def check_ready_once(base_url: str, timeout: float) -> tuple[bool, str]:
    """(ready, what was seen). /health_generate first; /health when that route is missing."""
    last = ""
    for route in ("/health_generate", "/health"):
        try:
            status, _ = http_call("GET", base_url + route, timeout=timeout)
        except RequestFailed as err:
            return False, str(err)
        if status == 200:
            return True, f"{route} 200"
        last = f"{route} HTTP {status}"
        if status != 404:
            return False, last
    return False, last


def flush_cache(base_url: str, timeout: float = 60.0) -> str | None:
    """GET /flush_cache, retried while the server still has requests; a warning or None."""
    last = ""
    for _ in range(10):
        try:
            status, body = http_call("GET", base_url + "/flush_cache", timeout=timeout)
        except RequestFailed as err:
            return f"/flush_cache failed: {err}"
        if status == 200:
            return None
        last = f"HTTP {status}: {' '.join(body.decode('utf-8', 'replace').split())[:120]}"
        time.sleep(0.5)
    return f"/flush_cache did not succeed ({last}); the prefix cache may carry over"


def get_server_info(base_url: str, timeout: float = 30.0) -> dict | None:
    for route in ("/server_info", "/get_server_info"):
        try:
            status, body = http_call("GET", base_url + route, timeout=timeout)
        except RequestFailed:
            return None
        if status == 200:
            try:
                info = json.loads(body)
            except ValueError:
                return None
            return info if isinstance(info, dict) else None
    return None


def server_avg_accept_length(info: dict | None) -> float | None:
    try:
        value = (info or {}).get("internal_states", [{}])[0].get("avg_spec_accept_length")
    except (AttributeError, IndexError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


# ----------------------------------------------------------------------------- requests

@dataclass
class RequestResult:
    latency: float
    completion_tokens: int
    prompt_tokens: int
    ttft: float | None = None
    accept_length: float | None = None
    accept_source: str | None = None
    verify_ct: int | None = None
    accepted_drafts: int | None = None
    proposed_drafts: int | None = None
    server_e2e: float | None = None


def _first_number(meta: dict, names: Sequence[str]):
    for name in names:
        value = meta.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    return None


def read_meta(meta: dict, latency: float, ttft: float | None) -> RequestResult:
    """Turn one response's meta_info into a RequestResult, reading fields defensively (names
    changed between sglang releases; the spec fields are absent when spec_verify_ct is 0)."""
    if not isinstance(meta, dict):
        raise RequestFailed("response has no meta_info")
    completion = _first_number(meta, ["completion_tokens"])
    if completion is None:
        raise RequestFailed("response meta_info has no completion_tokens")
    verify = _first_number(meta, ["spec_verify_ct"])
    accept = _first_number(meta, ["spec_accept_length", "accept_length"])
    source = "spec_accept_length" if accept is not None and accept > 0 else None
    if source is None:
        accept = None
        if verify:
            accept, source = completion / verify, "completion_tokens/spec_verify_ct"
    return RequestResult(
        latency=latency, completion_tokens=int(completion),
        prompt_tokens=int(_first_number(meta, ["prompt_tokens"]) or 0), ttft=ttft,
        accept_length=float(accept) if accept is not None else None, accept_source=source,
        verify_ct=int(verify) if verify is not None else None,
        accepted_drafts=_first_number(meta, ["spec_accepted_drafts", "spec_num_correct_drafts"]),
        proposed_drafts=_first_number(meta, ["spec_proposed_drafts", "spec_num_proposed_drafts"]),
        server_e2e=_first_number(meta, ["e2e_latency"]))


def sampling_params(args: argparse.Namespace) -> dict:
    params = {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens}
    if args.temperature == 0:
        params.update(top_p=1.0, top_k=1)
    if args.ignore_eos:
        params["ignore_eos"] = True
    return params


def send_generate(base_url: str, text, params: dict, timeout: float,
                  stream: bool = False) -> list[RequestResult]:
    """POST /generate with one prompt (or a batched list); one RequestResult per prompt."""
    payload = {"text": text, "sampling_params": params}
    if stream and isinstance(text, str):
        return [_send_streaming(base_url, payload, timeout)]
    t0 = time.perf_counter()
    status, body = http_call("POST", base_url + "/generate", payload, timeout=timeout)
    latency = time.perf_counter() - t0
    if status != 200:
        snippet = " ".join(body.decode("utf-8", "replace").split())[:200]
        raise RequestFailed(f"HTTP {status}" + (f": {snippet}" if snippet else ""))
    try:
        data = json.loads(body)
    except ValueError:
        raise RequestFailed("the response is not JSON") from None
    items = data if isinstance(data, list) else [data]
    if isinstance(text, list) and len(items) != len(text):
        raise RequestFailed(f"{len(text)} prompts sent, {len(items)} answers received")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise RequestFailed("an answer is not a JSON object")
        if "error" in item and "meta_info" not in item:
            raise RequestFailed(f"server error: {str(item['error'])[:200]}")
        out.append(read_meta(item.get("meta_info"), latency, None))
    return out


def _send_streaming(base_url: str, payload: dict, timeout: float) -> RequestResult:
    payload = dict(payload, stream=True)
    req = urllib.request.Request(base_url + "/generate", data=json.dumps(payload).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = None
    last = None
    try:
        with _opener_for(base_url).open(req, timeout=timeout) as resp:
            for raw in resp:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                try:
                    obj = json.loads(data)
                except ValueError:
                    raise RequestFailed("a streamed chunk is not JSON") from None
                if isinstance(obj, dict) and "error" in obj and "meta_info" not in obj:
                    raise RequestFailed(f"server error: {str(obj['error'])[:200]}")
                if first is None:
                    first = time.perf_counter() - t0
                last = obj
    except urllib.error.HTTPError as err:
        raise RequestFailed(_describe_error(err, timeout)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise RequestFailed(_describe_error(err, timeout)) from None
    latency = time.perf_counter() - t0
    if last is None:
        raise RequestFailed("the stream ended without any data")
    return read_meta(last.get("meta_info") if isinstance(last, dict) else None, latency, first)


@dataclass
class LoadRun:
    results: list[RequestResult]
    duration: float
    max_inflight: int


def run_load(base_url: str, prompts: list[str], concurrency: int, args: argparse.Namespace,
             label: str) -> LoadRun:
    """Send every prompt with exactly ``concurrency`` in flight (or in one batch at a time with
    --batch-requests); the first failure stops the run and raises RequestFailed."""
    params = sampling_params(args)
    n = len(prompts)
    if args.batch_requests:
        units = [list(range(i, min(i + concurrency, n))) for i in range(0, n, concurrency)]
        workers = 1
    else:
        units = [[i] for i in range(n)]
        workers = min(concurrency, n)
    results: list[RequestResult | None] = [None] * n
    lock = threading.Lock()
    state = {"next": 0, "inflight": 0, "max": 0}
    failures: list[str] = []
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            with lock:
                if state["next"] >= len(units):
                    return
                unit = units[state["next"]]
                state["next"] += 1
                state["inflight"] += len(unit)
                state["max"] = max(state["max"], state["inflight"])
            try:
                text = [prompts[i] for i in unit] if args.batch_requests else prompts[unit[0]]
                got = send_generate(base_url, text, params, args.timeout_s, args.stream)
            except RequestFailed as err:
                with lock:
                    what = (f"batch of requests {unit[0] + 1}-{unit[-1] + 1}"
                            if args.batch_requests else f"request {unit[0] + 1}")
                    kind = "warm-up " if label == "warmup" else ""
                    failures.append(f"{kind}{what} of {n} failed: {err}")
                stop.set()
                return
            except Exception as err:  # noqa: BLE001 - report, do not hang the run
                with lock:
                    failures.append(f"request {unit[0] + 1} of {n} failed: "
                                    f"{type(err).__name__}: {err}")
                stop.set()
                return
            finally:
                with lock:
                    state["inflight"] -= len(unit)
            for i, res in zip(unit, got):
                results[i] = res

    threads = [threading.Thread(target=worker, name=f"bench-{label}-{k}", daemon=True)
               for k in range(workers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)  # short joins so Ctrl-C / SIGTERM reach the main thread
    duration = time.perf_counter() - t0
    if failures:
        raise RequestFailed(failures[0])
    return LoadRun([r for r in results if r is not None], duration, state["max"])


