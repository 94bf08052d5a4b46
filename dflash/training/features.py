"""Target features for training: the selected layers' hidden states, as the decoding engines take them."""
from __future__ import annotations

from contextlib import contextmanager

import torch


def _decoder_layers(target):
    inner = target.model if hasattr(target, "model") else target.base_model
    return inner, inner.layers


@contextmanager
def capture_layers(target, layer_ids: list[int]):
    """Record the raw output of the listed decoder layers (hooks: no full hidden-state list)."""
    _, layers = _decoder_layers(target)
    store: dict[int, torch.Tensor] = {}
    handles = []
    for lid in sorted(set(layer_ids)):
        def hook(_mod, _inp, out, lid=lid):
            store[lid] = out[0] if isinstance(out, tuple) else out
        handles.append(layers[lid].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def target_features(target, input_ids: torch.Tensor, layer_ids: list[int]) -> torch.Tensor:
    """Concatenated features of ``layer_ids`` for every position: [B, S, n_f*H] (no shift).

    Layer ``l``'s feature is HF's ``hidden_states[l + 1]``, as the reference and the decoding
    engines take it: the layer's output, except that the last layer's is the final-normed state.
    """
    inner, layers = _decoder_layers(target)
    with capture_layers(target, layer_ids) as store:
        inner(input_ids=input_ids, use_cache=False)
    last = len(layers) - 1
    return torch.cat([inner.norm(store[l]) if l == last else store[l] for l in layer_ids], dim=-1)
