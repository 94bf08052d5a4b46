"""The run of benchmark_sglang.py: for each server (launched here, or --base-url), each
concurrency: flush, untimed warm-up, flush, timed load; every finished configuration is logged
and the reports rewritten at once, so an error, Ctrl-C or SIGTERM keeps what finished and
leaves no server behind."""
from __future__ import annotations

import contextlib
import signal
import sys
import time
from dataclasses import dataclass
from typing import Sequence

from ..errors import UserError, run_cli
from ..runlog import GracefulStop
from .cli import (IDENTITY_KEYS, LAUNCH_ENV_VAR, MODE_LABEL, MODES, Paths, identity_of,
                  n_prompts, output_paths, parse_args)
from .client import (RequestFailed, check_reachable, check_ready_once, flush_cache,
                     get_server_info, run_load, sampling_params, send_generate,
                     server_avg_accept_length)
from .prompts import build_prompts, prompts_for
from .report import Reporter, _fmt, summarize
from .servers import (ServerProcess, check_launch_environment, check_port_free, detect_gpu,
                      filter_backends, launch_command, launch_env_additions, launch_prefix,
                      pick_free_port, print_log_tail, sglang_version, shell_line,
                      stop_all_servers, wait_port_free)
from .store import ResultStore, now as _now, precheck as precheck_log


class _Stop(GracefulStop):
    """Ctrl-C, SIGTERM and SIGHUP unwind the run (servers stopped, finished configurations
    kept); a finished configuration being logged is completed first."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def describe(self) -> str:
        if self.signum == signal.SIGINT or self.signum is None:
            return "interrupted (Ctrl-C)"
        return f"terminated by {self.signal_name}"

    def code(self) -> int:
        return 130 if self.signum in (signal.SIGINT, None) else 143


class Benchmark:
    def __init__(self, args, paths: Paths, store: ResultStore, reporter: Reporter,
                 texts: list[str], stop: GracefulStop | None = None):
        self.args, self.paths, self.store, self.reporter = args, paths, store, reporter
        self.texts = texts
        self.stop = stop

    def log(self, message: str) -> None:
        print(message, flush=True)

    def _flush(self, url: str, tag: str) -> None:
        warning = flush_cache(url)
        if warning:
            self.reporter.warn(f"{tag}: {warning}")

    def run_server_configs(self, url: str, backend: str, mode: str,
                           server: ServerProcess | None, extra: dict) -> None:
        args = self.args
        for c in args.concurrency_list:
            if self.stop is not None and self.stop.requested:
                raise KeyboardInterrupt  # a signal came while the last one was being logged
            if self.store.has(backend, mode, c):
                self.log(f"[{backend}] {MODE_LABEL[mode]} c={c}: already recorded, skipped")
                continue
            tag = f"{MODE_LABEL[mode]} {backend} c={c}"
            n = n_prompts(args, c)
            prompts = prompts_for(self.texts, n)
            try:
                self._flush(url, tag)
                run_load(url, prompts_for(self.texts, c), c, args, "warmup")  # untimed
                self._flush(url, tag)
                load = run_load(url, prompts, c, args, "timed")
            except RequestFailed as err:
                code = server.exit_code() if server else None
                if server and code is not None:
                    print_log_tail(server.log_path)
                    raise UserError(f"{tag}: {err}; the server exited with code {code} (log: "
                                    f"{server.log_path})", exit_code=1) from None
                raise UserError(f"{tag}: {err}", exit_code=1) from None
            metrics, warnings = summarize(load, mode)
            for w in warnings:
                self.reporter.warn(f"{tag}: {w}")
            rec = {"backend": backend, "mode": mode, "concurrency": c, "num_prompts": n,
                   **metrics, "warnings": warnings, "finished": _now(), **extra}
            if mode == "dflash":
                rec["server_avg_spec_accept_length"] = server_avg_accept_length(
                    get_server_info(url))
            with self.stop.committing() if self.stop else _nothing():
                self.store.add(rec)
                self.reporter.write("running")
            acc = "" if mode == "baseline" else \
                f", acceptance {_fmt(metrics['accept_length'], '.2f')}"
            self.log(f"[{backend}] {MODE_LABEL[mode]} c={c}: {n} requests, "
                     f"{_fmt(metrics['output_throughput'])} tok/s, "
                     f"{_fmt(metrics['request_throughput'], '.2f')} req/s, p50 latency "
                     f"{_fmt(metrics['median_e2e_latency_ms'], '.0f')} ms{acc}")

    def run_launched(self, backends: list[str], prefix: list[str], port: int,
                     gpu_name: str | None) -> None:
        args = self.args
        modes = [m for m in MODES if not (m == "baseline" and args.skip_baseline)]
        env_add = launch_env_additions()
        for backend in backends:
            for mode in modes:
                if all(self.store.has(backend, mode, c) for c in args.concurrency_list):
                    self.log(f"[{backend}] {MODE_LABEL[mode]}: every concurrency already "
                             f"recorded, server not launched")
                    continue
                wait_port_free(args.host, port, timeout=10.0)
                cmd = launch_command(args, mode, backend, port, prefix)
                log_path = self.paths.logs / f"server_{backend}_{mode}.log"
                label = f"{MODE_LABEL[mode]} ({backend})"
                server = ServerProcess(cmd, env_add, log_path, args.host, port, label,
                                       args.stop_grace_s)
                self.log(f"[{backend}] launching the {MODE_LABEL[mode]} server (log: "
                         f"{log_path})")
                if args.verbose:
                    self.log("  " + shell_line(cmd, env_add))
                server.start()
                try:
                    took = server.wait_ready(args.timeout_s, args.poll_interval_s)
                    self.log(f"[{backend}] {MODE_LABEL[mode]} server ready after {took:.1f} s")
                    self.run_server_configs(server.url, backend, mode, server,
                                            {"gpu": gpu_name, "server_cmd": shell_line(cmd)})
                finally:
                    server.stop()

    def run_external(self, external: "ExternalServer") -> None:
        self.log(f"[{external.backend}] server at {external.url}: {MODE_LABEL[external.mode]} "
                 f"(from {external.detected_from})")
        self.reporter.settings["attention_backends_run"] = [external.backend]
        self.run_server_configs(external.url, external.backend, external.mode, None,
                                {"gpu": None, "server_cmd": None, "base_url": external.url,
                                 "server_version": external.info.get("version")})


@dataclass
class ExternalServer:
    url: str
    backend: str
    mode: str
    info: dict
    detected_from: str


def probe_external(args, texts: list[str]) -> ExternalServer:
    """The --base-url server (found reachable by :func:`check_reachable`), before anything is
    written: ready (else exit 1 after --timeout-s), and which mode it serves (/server_info,
    else one short probe request)."""
    url = args.base_url
    t0 = time.monotonic()
    while True:
        ok, seen = check_ready_once(url, timeout=min(30.0, args.timeout_s))
        if ok:
            break
        if time.monotonic() - t0 > args.timeout_s:
            raise UserError(f"the server at {url} was not ready after {args.timeout_s:g} s "
                            f"(last check: {seen})",
                            "check --base-url, or raise --timeout-s", exit_code=1)
        time.sleep(args.poll_interval_s)
    info = get_server_info(url) or {}
    backend = str(info.get("attention_backend") or "external")
    if "speculative_algorithm" in info:
        return ExternalServer(url, backend, "dflash" if info.get("speculative_algorithm")
                              else "baseline", info, "server_info")
    try:
        probe = send_generate(url, texts[0], dict(sampling_params(args), max_new_tokens=8),
                              args.timeout_s)
    except RequestFailed as err:
        raise UserError(f"the server at {url}: first request failed: {err}",
                        exit_code=1) from None
    return ExternalServer(url, backend, "dflash" if probe[0].verify_ct else "baseline", info,
                          "a probe request")


def dry_run(args, paths: Paths, prefix: list[str], overridden: bool) -> int:
    out = ["# benchmark_sglang.py --dry-run: nothing is started"]
    if args.base_url:
        out.append(f"# no server is launched: benchmarking the running server at "
                   f"{args.base_url}")
    else:
        gpu = detect_gpu()
        backends, notes = filter_backends(args.backend_list, gpu)
        if gpu.available:
            out.append(f"# GPU: {gpu.name} (SM {gpu.sm}), {gpu.count} visible")
        else:
            out.append(f"# GPU: none here ({gpu.reason}); on the GPU machine, attention "
                       f"backends it cannot run are dropped (fa3 needs SM 90, fa4 needs "
                       f"SM >= 100)")
        out += [f"# {n}" for n in notes]
        if overridden:
            out.append(f"# launch command overridden ({LAUNCH_ENV_VAR} / --server-cmd)")
        port = args.port if args.port else "<free port>"
        env_add = launch_env_additions()
        for backend in backends:
            for mode in MODES:
                if mode == "baseline" and args.skip_baseline:
                    continue
                out.append(f"# [{backend}] {MODE_LABEL[mode]} server")
                out.append(shell_line(launch_command(args, mode, backend, port, prefix),
                                      env_add))
    sizes = ", ".join(f"c={c}: {n_prompts(args, c)}" for c in args.concurrency_list)
    out.append(f"# per server: for each concurrency, an untimed warm-up of c requests, then "
               f"n = min({args.questions_per_concurrency_base} * c, "
               f"{args.max_questions_per_config}) prompts of {args.dataset_name} with c in "
               f"flight ({sizes}); GET /flush_cache between configurations")
    out.append(f"# results: {paths.jsonl}; reports: {paths.md}, {paths.json}, {paths.png}")
    print("\n".join(out), flush=True)
    return 0


def _before_output(fn, doing: str):
    """``fn()`` while nothing is written yet: SIGTERM / SIGHUP end the run in one line (143),
    Ctrl-C as everywhere (130)."""
    with _Stop() as stop:
        try:
            return fn()
        except KeyboardInterrupt:
            if stop.code() == 130:
                raise
            raise UserError(f"{stop.describe()} while {doing}; nothing was written",
                            exit_code=143) from None


@contextlib.contextmanager
def _nothing():
    yield


def main(argv: Sequence[str] | None = None) -> int:
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv_list)
    paths = output_paths(args)
    prefix, overridden = launch_prefix(args)
    if args.dry_run:
        return dry_run(args, paths, prefix, overridden)
    precheck_log(paths.jsonl, args.resume,
                 "--results-jsonl" if args.results_jsonl else "the results log")
    for w in args.startup_warnings:
        print(f"warning: {w}", file=sys.stderr)

    gpu = None
    backends: list[str] = []
    port = args.port
    if not args.base_url:
        gpu = check_launch_environment(args, overridden)
        backends, notes = filter_backends(args.backend_list, gpu)
        for note in notes:
            print(f"note: {note}", flush=True)
        if not backends:
            raise UserError(f"none of the attention backends {args.backend_list} runs on this "
                            f"GPU ({gpu.name}, SM {gpu.sm})",
                            "add flashinfer or triton to --attention-backends")
        if port == 0:
            port = pick_free_port(args.host)
        check_port_free(args.host, port)

    if args.base_url:  # a URL that leads nowhere fails here, in one line, before any output
        _before_output(lambda: check_reachable(args.base_url, args.connect_wait_s,
                                               args.poll_interval_s),
                       f"connecting to {args.base_url}")
    texts, source, note = build_prompts(args)
    if note:
        print(f"note: {note}", flush=True)
    external = None
    if args.base_url:  # nothing is written until the server is known to be there and ready
        external = _before_output(lambda: probe_external(args, texts),
                                  f"waiting for the server at {args.base_url}")
    identity = identity_of(args)
    store = ResultStore(paths.jsonl, identity, args.resume, argv_list, IDENTITY_KEYS)
    for n in store.notes:
        print(f"note: {n}", flush=True)
    settings = {
        "dataset": f"{args.dataset_name} ({source}, {len(texts)} prompts, first turns)",
        "target_model": args.target_model, "draft_model": args.draft_model,
        "chat_template": (f"{args.tokenizer_path} (enable_thinking={args.enable_thinking})"
                          if not args.no_chat_template else "none (raw prompt text)"),
        "concurrencies": args.concurrency_list,
        "prompts_per_concurrency": [n_prompts(args, c) for c in args.concurrency_list],
        "questions_per_concurrency_base": args.questions_per_concurrency_base,
        "max_questions_per_config": args.max_questions_per_config,
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "ignore_eos": args.ignore_eos, "stream": args.stream,
        "batch_requests": args.batch_requests,
        "server": args.base_url or "launched by this script",
        "attention_backends_requested": args.backend_list,
        "attention_backends_run": backends,
        "block_size": args.block_size if args.block_size is not None else "draft config",
        "dtype": args.dtype, "tp_size": args.tp_size,
        "mem_fraction_static": args.mem_fraction_static,
        "max_running_requests": args.max_running_requests,
        "radix_cache": "disabled" if args.disable_radix_cache else "enabled",
        "seed": args.seed, "gpu": gpu.name if gpu else "n/a",
        "sglang": sglang_version() or "n/a (not installed in this Python)",
        "started": _now(),
    }
    reporter = Reporter(args, paths, store, settings)
    status, error, failure = "failed", None, None
    with _Stop() as stop:
        bench = Benchmark(args, paths, store, reporter, texts, stop)
        try:
            if external is not None:
                bench.run_external(external)
            else:
                bench.run_launched(backends, prefix, port, gpu.name if gpu else None)
            status = "complete"
        except KeyboardInterrupt:
            status = "interrupted"
            error = stop.describe()
        except UserError as err:
            error, failure = err.one_line(), err
        finally:
            stop.disarm()  # a second signal must not cut the cleanup short
            stop_all_servers()
            try:
                reporter.write(status, error, plot=True)
            except Exception as werr:  # noqa: BLE001 - never mask the real error
                print(f"warning: could not write the reports ({type(werr).__name__}: {werr})",
                      file=sys.stderr)
    kept = f"{len(store.results)} configuration(s) kept in {paths.jsonl}"
    if failure is not None:
        hint = "; ".join(h for h in (failure.hint, "rerun with --resume to continue"
                                     if store.results else None) if h) or None
        message = f"{failure.message}; {kept}" if store.results else failure.message
        raise UserError(message, hint, failure.exit_code)
    if status == "interrupted":
        raise UserError(f"{error}; servers stopped, {kept}", "rerun with --resume to continue",
                        exit_code=stop.code())
    print(f"done: {paths.md}, {paths.json}" + (f", {paths.png}" if paths.png.exists() else "")
          + f" ({kept})", flush=True)
    return 0


def cli(argv: Sequence[str] | None = None) -> None:
    run_cli(main, argv)
