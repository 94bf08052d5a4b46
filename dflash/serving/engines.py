"""The three engines of benchmark_sglang.py (``--engine``), each as what the run needs of it:
how to launch its servers (None: it only benchmarks a running one), when a server is ready,
how its prefix cache is reset, how a request looks (:mod:`.protocols`) and where the
acceptance length comes from (SGLang: per request in ``meta_info``; vLLM and other OpenAI
servers: Prometheus counters at ``/metrics``, as deltas over each configuration)."""
from __future__ import annotations

import argparse

from . import prometheus, servers, vllm
from .client import check_ready_once, flush_cache, get_json, get_text
from .protocols import OpenAIProtocol, SGLangProtocol

ENGINES = ("sglang", "vllm", "openai")
TITLE = {"sglang": "SGLang", "vllm": "vLLM", "openai": "OpenAI-compatible server"}


class Engine:
    name = "sglang"
    acceptance_from = "meta_info"  # or "metrics"
    can_launch = True

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.model: str | None = None  # the served model name (OpenAI requests need it)
        self._flush_warned = False

    @property
    def title(self) -> str:
        return TITLE[self.name]

    # -- launching
    def launch_prefix(self):
        return servers.launch_prefix(self.args)

    def launch_command(self, mode: str, backend: str, port, prefix: list[str]) -> list[str]:
        return servers.launch_command(self.args, mode, backend, port, prefix)

    def launch_env(self) -> dict[str, str]:
        return servers.launch_env_additions()

    def check_launch_environment(self, overridden: bool):
        return servers.check_launch_environment(self.args, overridden)

    def backends(self) -> list[str]:
        return list(self.args.backend_list)

    def version(self) -> str | None:
        return servers.sglang_version()

    # -- talking to a server
    def ready_once(self, url: str, timeout: float) -> tuple[bool, str]:
        return check_ready_once(url, timeout)

    def flush(self, url: str) -> str | None:
        return flush_cache(url)

    def protocol(self, max_new_tokens: int | None = None):
        return SGLangProtocol(self.args, max_new_tokens)

    def discover_model(self, url: str) -> None:
        pass

    def spec_counters(self, url: str) -> dict | None:
        return None


class VLLMEngine(Engine):
    name = "vllm"
    acceptance_from = "metrics"

    def launch_prefix(self):
        return vllm.launch_prefix(self.args)

    def launch_command(self, mode, backend, port, prefix):
        return vllm.launch_command(self.args, mode, backend, port, prefix)

    def launch_env(self):
        return vllm.launch_env_additions()

    def check_launch_environment(self, overridden):
        return vllm.check_launch_environment(self.args, overridden)

    def backends(self):
        return vllm.backends(self.args)

    def version(self):
        return vllm.vllm_version()

    def ready_once(self, url, timeout):
        return check_ready_once(url, timeout, ("/health", "/v1/models"))

    def flush(self, url):
        if self._flush_warned:
            return None
        warning = flush_cache(url, method="POST", route="/reset_prefix_cache")
        if warning and "HTTP 404" in warning:
            self._flush_warned = True  # said once: the server has no such route
            return ("the server has no POST /reset_prefix_cache (vLLM offers it with "
                    "VLLM_SERVER_DEV_MODE=1); the prefix cache carries over between "
                    "configurations")
        return warning

    def protocol(self, max_new_tokens=None):
        return OpenAIProtocol(self.args, self.model or self.args.target_model or "default",
                              self.name, max_new_tokens)

    def discover_model(self, url):
        """The served model name from /v1/models (the target path when launched here)."""
        info = get_json(url, ("/v1/models",))
        data = (info or {}).get("data")
        if isinstance(data, list) and data and isinstance(data[0], dict) and data[0].get("id"):
            self.model = str(data[0]["id"])

    def spec_counters(self, url):
        return prometheus.spec_counters(get_text(url + "/metrics"))


class OpenAIEngine(VLLMEngine):
    """Any OpenAI-compatible server (llama.cpp's llama-server, TGI, ...): it is never
    launched here; acceptance only when it exposes counters this client knows."""

    name = "openai"
    can_launch = False

    def flush(self, url):
        return None  # no standard route; stated in the settings of the report

    def version(self):
        return None


def make_engine(args: argparse.Namespace) -> Engine:
    return {"sglang": Engine, "vllm": VLLMEngine, "openai": OpenAIEngine}[args.engine](args)
