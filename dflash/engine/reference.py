"""``HFTargetEngine``: the plain eager Transformers forward with a ``DynamicCache`` (reference).

It runs every causal LM transformers provides. Rolling back rejected tokens:
- attention layers (full or sliding): their keys/values are cropped to the accepted length
  (sliding layers keep their whole history here, so a crop never needs dropped keys; the
  model's own sliding mask limits what each query sees);
- recurrent layers (linear attention, short convolutions), whose state mixes every token and
  cannot be cropped: their state is snapshotted before each verify; when tokens of that
  verify are rejected, the snapshot is restored and the accepted tokens are replayed, so the
  state is exactly that of the accepted sequence.
"""
from __future__ import annotations

import torch


def _is_recurrent_layer(layer) -> bool:
    return hasattr(layer, "recurrent_states") or hasattr(layer, "conv_states")


def _snapshot(layer) -> dict:
    """A copy of a cache layer's state (tensors cloned: some kernels update them in place)."""
    def copy(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        if isinstance(v, dict):
            return {k: copy(x) for k, x in v.items()}
        return v
    return {k: copy(v) for k, v in vars(layer).items()}


class HFTargetEngine:
    """Reference path: the model's own eager forward with a DynamicCache, cropped on rollback
    (recurrent layers: snapshot + replay, see the module docstring)."""

    name = "hf"

    def __init__(self, model, feature_layer_ids: list[int], capacity: int):
        self.model = model
        self.feature_layer_ids = list(feature_layer_ids)
        weight = model.get_input_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        self.capacity = capacity
        self.reset()

    def reset(self):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        try:  # the model's own layer kinds (linear-attention layers need theirs)
            self.cache = DynamicCache(config=self.model.config)
        except Exception:  # noqa: BLE001 - a config the cache cannot read: plain layers
            self.cache = DynamicCache()
        layers = getattr(self.cache, "layers", [])
        for i, layer in enumerate(layers):
            if type(layer) is DynamicSlidingWindowLayer:  # keep history: crops stay exact
                layers[i] = DynamicLayer()
        self.recurrent = [i for i, l in enumerate(layers) if _is_recurrent_layer(l)]
        self.ids = torch.zeros(0, dtype=torch.long, device=self.device)  # tokens in the cache
        self._snap, self._snap_at = None, 0

    def _crop(self, length: int):
        layers = getattr(self.cache, "layers", None)
        if layers is not None:
            for layer in layers:
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys = layer.keys[:, :, :length]
                    layer.values = layer.values[:, :, :length]
        else:  # older cache layout
            self.cache.crop(length)

    def _run(self, input_ids, positions, hidden: bool):
        out = self.model(input_ids=input_ids, position_ids=positions[None],
                         past_key_values=self.cache, use_cache=True, output_hidden_states=hidden)
        self.cache = out.past_key_values
        self.ids = torch.cat([self.ids, input_ids[0]])
        return out

    def _rollback(self, start: int):
        """Make the cache hold exactly the first ``start`` tokens it has seen."""
        if self.recurrent and start < self.ids.numel():
            accepted = self.ids[self._snap_at:start]
            for i, snap in zip(self.recurrent, self._snap):
                vars(self.cache.layers[i]).update(snap)
            self._crop(self._snap_at)
            self.ids = self.ids[:self._snap_at]
            if accepted.numel():  # replay the accepted tokens of the last verify
                self._run(accepted[None], torch.arange(self._snap_at, start, device=self.device),
                          hidden=False)
        self._crop(start)
        self.ids = self.ids[:start]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None):
        start = int(positions[0])
        if start == 0:
            self.reset()
        else:
            self._rollback(start)
        if self.recurrent:
            self._snap = [_snapshot(self.cache.layers[i]) for i in self.recurrent]
            self._snap_at = start
        out = self._run(input_ids, positions, hidden=True)
        feats = torch.cat([out.hidden_states[l + 1] for l in self.feature_layer_ids], dim=-1)
        return out.logits, feats
