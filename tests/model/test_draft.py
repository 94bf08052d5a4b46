"""Loading z-lab draft checkpoints and checking that a draft fits its target."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dflash import DFlashDraftModel
from dflash.errors import UserError
from dflash.model.toy import make_random_draft, make_random_target

REAL_CONFIG = Path(__file__).parents[1] / "data" / "qwen3-4b-dflash-b16.config.json"


def published_weight_names(n_layers: int) -> list[str]:
    """Weight names as listed for the public checkpoints (no prefix, no embed/lm_head)."""
    names = ["fc.weight", "hidden_norm.weight", "norm.weight"]
    for i in range(n_layers):
        p = f"layers.{i}."
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    return names


def write_scaled_checkpoint(folder: Path) -> dict:
    cfg = json.loads(REAL_CONFIG.read_text())
    cfg.update(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, num_hidden_layers=2, num_target_layers=6, vocab_size=300,
               layer_types=["full_attention"] * 2, max_window_layers=2)
    cfg["dflash_config"] = {"mask_token_id": 299, "target_layer_ids": [1, 3]}
    h, d, i, nf = 64, 16, 96, 2
    shapes = {"fc.weight": (h, nf * h), "hidden_norm.weight": (h,), "norm.weight": (h,)}
    for n in range(2):
        p = f"layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (4 * d, h), p + "self_attn.k_proj.weight": (2 * d, h),
                       p + "self_attn.v_proj.weight": (2 * d, h), p + "self_attn.o_proj.weight": (h, 4 * d),
                       p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    assert sorted(shapes) == sorted(published_weight_names(2))
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "model.safetensors"))
    return cfg


def test_scaled_zlab_checkpoint_loads(tmp_path):
    write_scaled_checkpoint(tmp_path / "draft")
    draft = DFlashDraftModel.from_pretrained(tmp_path / "draft", dtype=torch.float32, device_map="cpu")
    assert draft.block_size == 16
    assert draft.mask_token_id == 299
    assert draft.target_layer_ids == [1, 3]
    assert draft.dtype == torch.float32
    assert draft.fc.weight.shape == (64, 128)
    # dtype 'auto' keeps the checkpoint's bfloat16
    auto = DFlashDraftModel.from_pretrained(str(tmp_path / "draft"), dtype="auto")
    assert auto.dtype == torch.bfloat16


def test_real_4b_config_on_meta_device():
    with torch.device("meta"):
        draft = DFlashDraftModel.from_config(REAL_CONFIG)
    assert draft.block_size == 16
    assert draft.mask_token_id == 151669
    assert draft.target_layer_ids == [1, 9, 17, 25, 33]
    assert len(draft.layers) == 5
    assert draft.fc.weight.shape == (2560, 5 * 2560)
    n_params = sum(p.numel() for p in draft.parameters())
    assert 0.4e9 < n_params < 0.8e9  # about 0.5B without embeddings / LM head


def test_save_and_reload_round_trip(tmp_path):
    target = make_random_target()
    draft = make_random_draft(target, block_size=8)
    draft.save_pretrained(tmp_path / "d")
    again = DFlashDraftModel.from_pretrained(tmp_path / "d", dtype=torch.float32)
    for (k, a), (_, b) in zip(draft.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k  # bitwise by construction: safetensors stores the bytes
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["block_size"] == 8 and "dflash_config" in cfg and "num_target_layers" in cfg


@pytest.mark.parametrize("change, message", [
    ("hidden", "hidden size"), ("layers", "target layer ids"), ("mask", "mask token id")])
def test_draft_that_does_not_fit_is_refused(change, message):
    target = make_random_target(num_layers=4, vocab_size=128)
    draft = make_random_draft(target)
    if change == "hidden":
        draft.config.hidden_size = 32
    elif change == "layers":
        draft.config.target_layer_ids = [1, 7]
    else:
        draft.config.mask_token_id = 500
    with pytest.raises(UserError, match=message):
        draft.check_target(target)


def test_missing_draft_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        DFlashDraftModel.from_pretrained(tmp_path / "nope")


def test_quickstart_spec_generate_shape():
    target = make_random_target()
    draft = make_random_draft(target, block_size=4, cls=DFlashDraftModel)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    out = draft.spec_generate(target=target, input_ids=ids, max_new_tokens=10, temperature=0.0,
                              stop_token_ids=[])
    assert out.dtype == torch.long and out.shape == (1, 15)
    assert torch.equal(out[:, :5], ids)
