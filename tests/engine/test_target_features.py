"""Issue 21: target features as the reference takes them, ``hidden_states[id + 1]``; for a
layer id equal to the target's last layer that is HF's post-final-norm state."""
import pytest
import torch

from dflash.engine.reference import HFTargetEngine
from dflash.engine.static import StaticTargetEngine
from dflash.model.toy import make_random_target


@pytest.mark.parametrize("engine", ["static", "fused", "hf"])
def test_features_equal_hf_hidden_states(engine):
    target = make_random_target(vocab_size=96, hidden_size=64, num_layers=3, dtype=torch.float64)
    ids = torch.randint(0, 96, (1, 11), generator=torch.Generator().manual_seed(0))
    hs = target(ids, output_hidden_states=True).hidden_states
    layer_ids = [0, 1, 2]  # 2 = the last layer
    if engine == "hf":
        eng = HFTargetEngine(target, layer_ids, 64)
        _, feats = eng.forward(ids, torch.arange(11), kv_len=11)
    else:
        eng = StaticTargetEngine(target, layer_ids, 64, fused=engine == "fused")
        # fused: the whole-buffer (graph-mode) path; static: the eager prefix path
        _, feats = eng.forward(ids, torch.arange(11), kv_len=None if engine == "fused" else 11)
    want = torch.cat([hs[i + 1] for i in layer_ids], dim=-1)
    torch.testing.assert_close(feats, want, rtol=1e-9, atol=1e-9)


def test_hf_last_hidden_state_is_post_norm():
    """What the test above relies on: transformers' hidden_states[L] is the final-normed
    output of the last layer, not its raw residual."""
    target = make_random_target(vocab_size=96, hidden_size=64, num_layers=3, dtype=torch.float64)
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(1))
    seen = {}
    hook = target.model.layers[-1].register_forward_hook(
        lambda mod, args, out: seen.setdefault("raw", out[0] if isinstance(out, tuple) else out))
    hs = target(ids, output_hidden_states=True).hidden_states
    hook.remove()
    torch.testing.assert_close(hs[3], target.model.norm(seen["raw"]), rtol=1e-12, atol=1e-12)
    assert (hs[3] - seen["raw"]).abs().max() > 1e-2
