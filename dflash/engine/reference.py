"""``HFTargetEngine``: the plain eager Transformers forward with a ``DynamicCache`` (reference)."""
from __future__ import annotations

import torch


class HFTargetEngine:
    """Reference path: the model's own eager forward with a DynamicCache, cropped on rollback."""

    name = "hf"

    def __init__(self, model, feature_layer_ids: list[int], capacity: int):
        from transformers import DynamicCache

        self.model = model
        self.feature_layer_ids = list(feature_layer_ids)
        self.cache = DynamicCache()
        weight = model.get_input_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        self.capacity = capacity

    def reset(self):
        from transformers import DynamicCache
        self.cache = DynamicCache()

    def _crop(self, length: int):
        layers = getattr(self.cache, "layers", None)
        if layers is not None:
            for layer in layers:
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys = layer.keys[:, :, :length]
                    layer.values = layer.values[:, :, :length]
        else:  # older cache layout
            self.cache.crop(length)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None):
        start = int(positions[0])
        if start == 0:
            self.reset()
        else:
            self._crop(start)
        out = self.model(input_ids=input_ids, position_ids=positions[None],
                         past_key_values=self.cache, use_cache=True, output_hidden_states=True)
        self.cache = out.past_key_values
        feats = torch.cat([out.hidden_states[l + 1] for l in self.feature_layer_ids], dim=-1)
        return out.logits, feats
