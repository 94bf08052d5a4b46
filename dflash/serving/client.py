"""HTTP client of the serving benchmark, on httpx: readiness probes, cache flushes, server
info, and the one async load generator every engine uses (SGLang ``/generate``, OpenAI
``/v1/completions``): exactly ``concurrency`` requests in flight, a time limit per request, no
retries (a failure is reported, never hidden), a progress bar on a terminal. Failures are
one-line :class:`RequestFailed`. What a request and its answer look like is the protocol's
job (:mod:`.protocols`)."""
from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.parse
from dataclasses import dataclass

import httpx

from ..errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


class RequestFailed(Exception):
    """One request failed; the message is one line. ``unreachable``: no connection was made
    (refused, unknown host, no route, connect timeout), as opposed to a server that answered
    badly, dropped the connection or was slow."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


def _trust_env(url: str) -> bool:
    """Proxy settings of the environment apply, except to this machine's own servers."""
    return (urllib.parse.urlparse(url).hostname or "") not in LOOPBACK


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def describe_error(err: BaseException, timeout: float) -> RequestFailed:
    """A transport error of httpx (or a time limit) as one line."""
    if isinstance(err, (httpx.ConnectTimeout, httpx.PoolTimeout)):
        return RequestFailed(f"cannot connect within {timeout:g} s", unreachable=True)
    if isinstance(err, httpx.ConnectError):
        text = str(err)
        if "refused" in text.lower():
            return RequestFailed("connection refused (is the server running?)", True)
        return RequestFailed(f"cannot connect ({_one_line(text) or type(err).__name__})", True)
    if isinstance(err, (httpx.TimeoutException, asyncio.TimeoutError, TimeoutError)):
        return RequestFailed(f"no answer within {timeout:g} s")
    if isinstance(err, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError,
                        ConnectionResetError, BrokenPipeError)):
        return RequestFailed(f"connection dropped by the server ({type(err).__name__})")
    return RequestFailed(f"{type(err).__name__}: {_one_line(err)}")


def http_error(status: int, body: bytes) -> RequestFailed:
    snippet = _one_line(body.decode("utf-8", "replace"))
    return RequestFailed(f"HTTP {status}" + (f": {snippet}" if snippet else ""))


def http_call(method: str, url: str, payload=None, timeout: float = 30.0) -> tuple[int, bytes]:
    """Send one request; returns (status, body) for any HTTP status; raises RequestFailed on
    transport errors (refused, dropped, timeout)."""
    try:
        with httpx.Client(timeout=timeout, trust_env=_trust_env(url)) as client:
            resp = client.request(method, url, json=payload)
            return resp.status_code, resp.content
    except (httpx.HTTPError, OSError) as err:
        raise describe_error(err, timeout) from None


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


def check_ready_once(base_url: str, timeout: float,
                     routes: tuple[str, ...] = ("/health_generate", "/health")) -> tuple[bool, str]:
    """(ready, what was seen): the first route that exists must answer 200 (a 404 moves on to
    the next route)."""
    last = ""
    for route in routes:
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


def flush_cache(base_url: str, timeout: float = 60.0, method: str = "GET",
                route: str = "/flush_cache") -> str | None:
    """Reset the server's prefix cache, retried while the server still has requests; a
    warning or None."""
    last = ""
    for _ in range(10):
        try:
            status, body = http_call(method, base_url + route, timeout=timeout)
        except RequestFailed as err:
            return f"{route} failed: {err}"
        if status == 200:
            return None
        last = f"HTTP {status}: {_one_line(body.decode('utf-8', 'replace'), 120)}"
        if status == 404:
            break
        time.sleep(0.5)
    return f"{route} did not succeed ({last}); the prefix cache may carry over"


def get_json(base_url: str, routes: tuple[str, ...], timeout: float = 30.0) -> dict | None:
    """The first of ``routes`` that answers 200 with a JSON object, else None."""
    for route in routes:
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


def get_server_info(base_url: str, timeout: float = 30.0) -> dict | None:
    return get_json(base_url, ("/server_info", "/get_server_info"), timeout)


def get_text(url: str, timeout: float = 30.0) -> str | None:
    """GET ``url`` as text (Prometheus /metrics); None when it fails or is not 200."""
    try:
        status, body = http_call("GET", url, timeout=timeout)
    except RequestFailed:
        return None
    return body.decode("utf-8", "replace") if status == 200 else None


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


@dataclass
class LoadRun:
    results: list[RequestResult]
    duration: float
    max_inflight: int


async def _send(client: httpx.AsyncClient, url: str, protocol, text, stream: bool,
                timeout: float) -> list[RequestResult]:
    payload = protocol.payload(text, stream)
    t0 = time.perf_counter()
    if not stream:
        resp = await client.post(url, json=payload)
        latency = time.perf_counter() - t0
        if resp.status_code != 200:
            raise http_error(resp.status_code, resp.content)
        try:
            data = resp.json()
        except ValueError:
            raise RequestFailed("the response is not JSON") from None
        return protocol.parse(data, text, latency)
    state = protocol.new_stream()
    async with client.stream("POST", url, json=payload) as resp:
        if resp.status_code != 200:
            raise http_error(resp.status_code, await resp.aread())
        async for line in resp.aiter_lines():
            line = line.strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                obj = json.loads(data)
            except ValueError:
                raise RequestFailed("a streamed chunk is not JSON") from None
            protocol.on_event(state, obj, time.perf_counter() - t0)
    return [protocol.finish_stream(state, time.perf_counter() - t0)]


def _progress(total: int, label: str):
    """A progress bar on an interactive stderr (tqdm when installed), else nothing."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=label, unit="req", leave=False, file=sys.stderr)


async def _load(base_url: str, prompts: list[str], concurrency: int, protocol, *, batch: bool,
                stream: bool, timeout: float, label: str) -> LoadRun:
    n = len(prompts)
    if batch:
        units = [list(range(i, min(i + concurrency, n))) for i in range(0, n, concurrency)]
        workers = 1
    else:
        units = [[i] for i in range(n)]
        workers = min(concurrency, n)
    results: list[RequestResult | None] = [None] * n
    state = {"next": 0, "inflight": 0, "max": 0}
    failures: list[str] = []
    url = base_url + protocol.route
    bar = _progress(n, label) if label == "timed" else None
    # exactly `workers` connections: a request never waits in httpx's pool, and every
    # request is sent once (httpx does not retry).
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits,
                                 trust_env=_trust_env(base_url)) as client:

        async def worker() -> None:
            while not failures and state["next"] < len(units):
                unit = units[state["next"]]
                state["next"] += 1
                state["inflight"] += len(unit)
                state["max"] = max(state["max"], state["inflight"])
                text = [prompts[i] for i in unit] if batch else prompts[unit[0]]
                try:
                    got = await asyncio.wait_for(_send(client, url, protocol, text, stream,
                                                       timeout), timeout)
                except Exception as err:  # noqa: BLE001 - one line per failure, no hang
                    err = err if isinstance(err, RequestFailed) else describe_error(err, timeout)
                    what = (f"batch of requests {unit[0] + 1}-{unit[-1] + 1}" if batch
                            else f"request {unit[0] + 1}")
                    kind = "warm-up " if label == "warmup" else ""
                    failures.append(f"{kind}{what} of {n} failed: {err}")
                    return
                finally:
                    state["inflight"] -= len(unit)
                for i, res in zip(unit, got):
                    results[i] = res
                if bar is not None:
                    bar.update(len(unit))

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(workers)]
        try:
            while tasks:
                done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                tasks = list(pending)
                if failures:  # the first failure ends the run: no request left running
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    break
        finally:
            if bar is not None:
                bar.close()
        duration = time.perf_counter() - t0
    if failures:
        raise RequestFailed(failures[0])
    return LoadRun([r for r in results if r is not None], duration, state["max"])


def run_load(base_url: str, prompts: list[str], concurrency: int, args, label: str,
             protocol) -> LoadRun:
    """Send every prompt with exactly ``concurrency`` in flight (or in one batch at a time with
    --batch-requests) in the shape of ``protocol`` (:mod:`.protocols`); the first failure
    stops the run and raises RequestFailed."""
    return asyncio.run(_load(base_url, prompts, concurrency, protocol,
                             batch=bool(args.batch_requests), stream=bool(args.stream),
                             timeout=args.timeout_s, label=label))
