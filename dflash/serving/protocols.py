"""What one request and its answer look like, per engine, for the load generator of
:mod:`.client`:

- :class:`SGLangProtocol`: SGLang's native ``POST /generate`` (one prompt or a batched list;
  ``meta_info`` carries token counts and the per-request acceptance length).
- :class:`OpenAIProtocol`: ``POST /v1/completions`` of vLLM, llama.cpp and any
  OpenAI-compatible server, with the chat template already applied client-side (the same
  prompt text the SGLang path sends); token counts from ``usage``; with ``stream`` the
  server-sent events give TTFT, and ``stream_options.include_usage`` the token count.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Sequence

from .client import RequestFailed, RequestResult


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
    else:  # "off" is left out: SGLang's own off is top_k -1, not our 0
        if args.top_p != 1.0:
            params["top_p"] = args.top_p
        if args.top_k > 0:
            params["top_k"] = args.top_k
    if args.ignore_eos:
        params["ignore_eos"] = True
    return params


def _server_error(obj) -> None:
    if isinstance(obj, dict) and "error" in obj and "meta_info" not in obj \
            and "choices" not in obj:
        err = obj["error"]
        if isinstance(err, dict):
            err = err.get("message", err)
        raise RequestFailed(f"server error: {' '.join(str(err).split())[:200]}")


@dataclass
class StreamState:
    first: float | None = None
    last: dict | None = None
    usage: dict | None = None
    events: int = 0
    extra: dict = field(default_factory=dict)


class SGLangProtocol:
    route = "/generate"

    def __init__(self, args: argparse.Namespace, max_new_tokens: int | None = None):
        self.params = sampling_params(args)
        if max_new_tokens is not None:
            self.params["max_new_tokens"] = max_new_tokens

    def payload(self, text, stream: bool) -> dict:
        body = {"text": text, "sampling_params": self.params}
        return dict(body, stream=True) if stream else body

    def parse(self, data, text, latency: float) -> list[RequestResult]:
        items = data if isinstance(data, list) else [data]
        if isinstance(text, list) and len(items) != len(text):
            raise RequestFailed(f"{len(text)} prompts sent, {len(items)} answers received")
        out = []
        for item in items:
            if not isinstance(item, dict):
                raise RequestFailed("an answer is not a JSON object")
            _server_error(item)
            out.append(read_meta(item.get("meta_info"), latency, None))
        return out

    def new_stream(self) -> StreamState:
        return StreamState()

    def on_event(self, state: StreamState, obj, at: float) -> None:
        _server_error(obj)
        if state.first is None:
            state.first = at
        state.last = obj

    def finish_stream(self, state: StreamState, latency: float) -> RequestResult:
        if state.last is None:
            raise RequestFailed("the stream ended without any data")
        last = state.last
        return read_meta(last.get("meta_info") if isinstance(last, dict) else None, latency,
                         state.first)


class OpenAIProtocol:
    """``/v1/completions``: ``prompt`` is the chat-templated text; ``model`` the served name."""

    route = "/v1/completions"

    def __init__(self, args: argparse.Namespace, model: str, engine: str,
                 max_new_tokens: int | None = None):
        self.body = {"model": model,
                     "max_tokens": max_new_tokens or args.max_new_tokens,
                     "temperature": args.temperature}
        if args.temperature == 0:
            self.body["top_p"] = 1.0
            if engine == "vllm":  # an extension vLLM documents; other servers may refuse it
                self.body["top_k"] = 1
        else:
            if args.top_p != 1.0:
                self.body["top_p"] = args.top_p
            if args.top_k > 0:  # asked for: vLLM and llama.cpp take it (outside OpenAI's API)
                self.body["top_k"] = args.top_k
        if args.ignore_eos:
            self.body["ignore_eos"] = True  # vLLM and llama.cpp extension
        if args.seed is not None:
            self.body["seed"] = args.seed

    def payload(self, text, stream: bool) -> dict:
        body = dict(self.body, prompt=text)
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return body

    @staticmethod
    def _usage(usage, latency: float, ttft: float | None) -> RequestResult:
        if not isinstance(usage, dict):
            raise RequestFailed("the answer has no usage (token counts)")
        completion = _first_number(usage, ["completion_tokens"])
        if completion is None:
            raise RequestFailed("the answer's usage has no completion_tokens")
        return RequestResult(latency=latency, completion_tokens=int(completion),
                             prompt_tokens=int(_first_number(usage, ["prompt_tokens"]) or 0),
                             ttft=ttft)

    def parse(self, data, text, latency: float) -> list[RequestResult]:
        if not isinstance(data, dict):
            raise RequestFailed("the answer is not a JSON object")
        _server_error(data)
        if not isinstance(data.get("choices"), list) or not data["choices"]:
            raise RequestFailed("the answer has no choices")
        return [self._usage(data.get("usage"), latency, None)]

    def new_stream(self) -> StreamState:
        return StreamState()

    def on_event(self, state: StreamState, obj, at: float) -> None:
        _server_error(obj)
        if not isinstance(obj, dict):
            raise RequestFailed("a streamed chunk is not a JSON object")
        state.events += 1
        choices = obj.get("choices") or []
        if state.first is None and any(isinstance(c, dict) and c.get("text") for c in choices):
            state.first = at  # the first chunk that carries generated text
        if isinstance(obj.get("usage"), dict):
            state.usage = obj["usage"]

    def finish_stream(self, state: StreamState, latency: float) -> RequestResult:
        if not state.events:
            raise RequestFailed("the stream ended without any data")
        if state.usage is None:
            raise RequestFailed("the stream carried no usage (the server ignored "
                                "stream_options.include_usage)")
        return self._usage(state.usage, latency, state.first)
