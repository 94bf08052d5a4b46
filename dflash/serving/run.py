"""The run of benchmark_sglang.py: for each server (launched here, or --base-url), each
concurrency: reset the prefix cache, untimed warm-up, reset, timed load (with the server's
speculative-decoding counters read around it where the engine reports acceptance there);
every finished configuration is logged and the reports rewritten at once, so an error,
Ctrl-C or SIGTERM keeps what finished and leaves no server behind."""
from __future__ import annotations

import contextlib
import signal
import sys
from typing import Sequence

from ..errors import UserError, run_cli
from ..runlog import GracefulStop
from .cli import IDENTITY_DEFAULTS, IDENTITY_KEYS, MODE_LABEL, MODES, Paths, identity_of, \
    n_prompts, output_paths, parse_args
from .client import RequestFailed, check_reachable, get_server_info, run_load, \
    server_avg_accept_length
from .engines import Engine, make_engine
from .external import ExternalServer, dry_run, probe_external  # noqa: F401 - re-exported
from .prompts import build_prompts, prompts_for
from .prometheus import acceptance_delta
from .report import Reporter, _fmt, summarize
from .servers import ServerProcess, check_port_free, filter_backends, pick_free_port, \
    print_log_tail, shell_line, stop_all_servers, wait_port_free
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


@contextlib.contextmanager
def _nothing():
    yield


class Benchmark:
    def __init__(self, args, paths: Paths, store: ResultStore, reporter: Reporter,
                 texts: list[str], stop: GracefulStop | None = None,
                 engine: Engine | None = None):
        self.args, self.paths, self.store, self.reporter = args, paths, store, reporter
        self.texts = texts
        self.stop = stop
        self.engine = engine or make_engine(args)

    def log(self, message: str) -> None:
        print(message, flush=True)

    def _flush(self, url: str, tag: str) -> None:
        warning = self.engine.flush(url)
        if warning:
            self.reporter.warn(f"{tag}: {warning}")

    def _tag(self, backend: str) -> str:
        return backend if self.engine.name == "sglang" else f"{self.engine.name} {backend}"

    def run_server_configs(self, url: str, backend: str, mode: str,
                           server: ServerProcess | None, extra: dict) -> None:
        args, engine = self.args, self.engine
        protocol = engine.protocol()
        for c in args.concurrency_list:
            if self.stop is not None and self.stop.requested:
                raise KeyboardInterrupt  # a signal came while the last one was being logged
            if self.store.has(backend, mode, c, engine.name):
                self.log(f"[{self._tag(backend)}] {MODE_LABEL[mode]} c={c}: already "
                         f"recorded, skipped")
                continue
            tag = f"{MODE_LABEL[mode]} {self._tag(backend)} c={c}"
            n = n_prompts(args, c)
            prompts = prompts_for(self.texts, n)
            try:
                self._flush(url, tag)
                run_load(url, prompts_for(self.texts, c), c, args, "warmup", protocol)
                self._flush(url, tag)
                before = engine.spec_counters(url)
                load = run_load(url, prompts, c, args, "timed", protocol)
                after = engine.spec_counters(url)
            except RequestFailed as err:
                code = server.exit_code() if server else None
                if server and code is not None:
                    print_log_tail(server.log_path)
                    raise UserError(f"{tag}: {err}; the server exited with code {code} (log: "
                                    f"{server.log_path})", exit_code=1) from None
                raise UserError(f"{tag}: {err}", exit_code=1) from None
            counters = acceptance_delta(before, after) if engine.acceptance_from == "metrics" \
                else None
            metrics, warnings = summarize(load, mode, engine=engine.name, counters=counters)
            for w in warnings:
                self.reporter.warn(f"{tag}: {w}")
            rec = {"engine": engine.name, "backend": backend, "mode": mode, "concurrency": c,
                   "num_prompts": n, **metrics, "warnings": warnings, "finished": _now(),
                   **extra}
            if mode == "dflash" and engine.name == "sglang":
                rec["server_avg_spec_accept_length"] = server_avg_accept_length(
                    get_server_info(url))
            with self.stop.committing() if self.stop else _nothing():
                self.store.add(rec)
                self.reporter.write("running")
            acc = "" if mode == "baseline" else \
                f", acceptance {_fmt(metrics['accept_length'], '.2f')}"
            self.log(f"[{self._tag(backend)}] {MODE_LABEL[mode]} c={c}: {n} requests, "
                     f"{_fmt(metrics['output_throughput'])} tok/s, "
                     f"{_fmt(metrics['request_throughput'], '.2f')} req/s, p50 latency "
                     f"{_fmt(metrics['median_e2e_latency_ms'], '.0f')} ms{acc}")

    def run_launched(self, backends: list[str], prefix: list[str], port: int,
                     gpu_name: str | None) -> None:
        args, engine = self.args, self.engine
        modes = [m for m in MODES if not (m == "baseline" and args.skip_baseline)]
        env_add = engine.launch_env()
        for backend in backends:
            for mode in modes:
                if all(self.store.has(backend, mode, c, engine.name)
                       for c in args.concurrency_list):
                    self.log(f"[{self._tag(backend)}] {MODE_LABEL[mode]}: every concurrency "
                             f"already recorded, server not launched")
                    continue
                wait_port_free(args.host, port, timeout=10.0)
                cmd = engine.launch_command(mode, backend, port, prefix)
                name = backend if engine.name == "sglang" else f"{engine.name}_{backend}"
                log_path = self.paths.logs / f"server_{name}_{mode}.log"
                label = f"{MODE_LABEL[mode]} ({self._tag(backend)})"
                server = ServerProcess(cmd, env_add, log_path, args.host, port, label,
                                       args.stop_grace_s, ready=engine.ready_once)
                self.log(f"[{self._tag(backend)}] launching the {MODE_LABEL[mode]} server "
                         f"(log: {log_path})")
                if args.verbose:
                    self.log("  " + shell_line(cmd, env_add))
                server.start()
                try:
                    took = server.wait_ready(args.timeout_s, args.poll_interval_s)
                    self.log(f"[{self._tag(backend)}] {MODE_LABEL[mode]} server ready after "
                             f"{took:.1f} s")
                    engine.discover_model(server.url)
                    self.run_server_configs(server.url, backend, mode, server,
                                            {"gpu": gpu_name, "server_cmd": shell_line(cmd)})
                finally:
                    server.stop()

    def run_external(self, external: ExternalServer) -> None:
        self.log(f"[{self._tag(external.backend)}] server at {external.url}: "
                 f"{MODE_LABEL[external.mode]} (from {external.detected_from})")
        self.reporter.settings["attention_backends_run"] = [external.backend]
        self.run_server_configs(external.url, external.backend, external.mode, None,
                                {"gpu": None, "server_cmd": None, "base_url": external.url,
                                 "server_version": external.info.get("version"),
                                 "served_model": self.engine.model})


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


def _settings(args, engine: Engine, source: str, texts: list[str], backends: list[str],
              gpu) -> dict:
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
        "top_p": args.top_p, "top_k": args.top_k, "ignore_eos": args.ignore_eos, "stream": args.stream,
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
    }
    if engine.name == "sglang":
        settings["sglang"] = engine.version() or "n/a (not installed in this Python)"
    else:
        settings = {"engine": engine.title, **settings,
                    "requests": "POST /v1/completions (chat template applied client-side)",
                    "acceptance": "1 + delta(accepted) / delta(drafts) of the /metrics "
                                  "counters over each timed run",
                    "prefix_cache_reset": {"vllm": "POST /reset_prefix_cache",
                                           "openai": "none"}[engine.name]}
        if engine.name == "vllm":
            settings["vllm"] = engine.version() or "n/a (not installed in this Python)"
    settings["started"] = _now()
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv_list)
    paths = output_paths(args)
    engine = make_engine(args)
    prefix, overridden = engine.launch_prefix() if engine.can_launch else (None, False)
    if args.dry_run:
        return dry_run(args, paths, engine, prefix, overridden)
    precheck_log(paths.jsonl, args.resume,
                 "--results-jsonl" if args.results_jsonl else "the results log")
    for w in args.startup_warnings:
        print(f"warning: {w}", file=sys.stderr)

    gpu = None
    backends: list[str] = []
    port = args.port
    if not args.base_url:
        wanted = engine.backends()  # vLLM refuses backends it has no equivalent for
        gpu = engine.check_launch_environment(overridden)
        backends, notes = (filter_backends(wanted, gpu) if engine.name == "sglang"
                           else (wanted, []))
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
        external = _before_output(lambda: probe_external(args, texts, engine),
                                  f"waiting for the server at {args.base_url}")
    store = ResultStore(paths.jsonl, identity_of(args), args.resume, argv_list, IDENTITY_KEYS,
                        IDENTITY_DEFAULTS)
    for n in store.notes:
        print(f"note: {n}", flush=True)
    reporter = Reporter(args, paths, store, _settings(args, engine, source, texts, backends,
                                                      gpu))
    status, error, failure = "failed", None, None
    with _Stop() as stop:
        bench = Benchmark(args, paths, store, reporter, texts, stop, engine)
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
