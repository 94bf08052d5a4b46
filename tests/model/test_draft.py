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


# ----------------------------------------------------------------------------- issue 21 config
def _variant_checkpoint(folder: Path, **changes) -> Path:
    """The scaled z-lab checkpoint with config changes (a key set to None is removed)."""
    cfg = write_scaled_checkpoint(folder)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_config_values_read_like_the_reference(tmp_path):
    """dflash_config first, then the top level, then the default."""
    folder = _variant_checkpoint(
        tmp_path / "d", dflash_config={"mask_token_id": 7, "block_size": 6,
                                       "final_logit_softcapping": 30.0},
        target_layer_ids=[0, 2], input_embedding_scale=2.0, output_multiplier=0.5,
        hidden_act="gelu")
    draft = DFlashDraftModel.from_pretrained(folder, dtype=torch.float32)
    cfg = draft.config
    assert (draft.mask_token_id, draft.block_size, draft.target_layer_ids) == (7, 6, [0, 2])
    assert (cfg.input_embedding_scale, cfg.output_multiplier, cfg.final_logit_softcapping,
            cfg.hidden_act) == (2.0, 0.5, 30.0, "gelu")
    # saved and reloaded: the same values, from the same places
    draft.save_pretrained(tmp_path / "again")
    again = DFlashDraftModel.from_pretrained(tmp_path / "again", dtype=torch.float32).config
    assert (again.block_size, again.mask_token_id, again.target_layer_ids,
            again.input_embedding_scale, again.output_multiplier,
            again.final_logit_softcapping, again.hidden_act) == \
        (6, 7, [0, 2], 2.0, 0.5, 30.0, "gelu")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["dflash_config"]["block_size"] == 6


def test_top_level_mask_token_id_is_accepted(tmp_path):
    folder = _variant_checkpoint(tmp_path / "d", dflash_config={"target_layer_ids": [1, 3]},
                                 mask_token_id=298)
    assert DFlashDraftModel.from_pretrained(folder).mask_token_id == 298


def test_attention_kinds_follow_the_reference_rules(tmp_path):
    from dflash.model.draft import kind_mask

    sliding = ["sliding_attention", "full_attention"]
    cases = [
        (dict(layer_types=sliding, use_sliding_window=True, sliding_window=3), [(True, 3), (False, None)]),
        (dict(layer_types=sliding, sliding_window=None), [(True, None), (False, None)]),
        (dict(is_causal=True), [(True, None), (True, None)]),
        (dict(layer_types=sliding, use_sliding_window=True, sliding_window=3, is_causal=False),
         [(False, 3), (False, None)]),
    ]
    for i, (changes, kinds) in enumerate(cases):
        folder = _variant_checkpoint(tmp_path / str(i), **changes)
        assert DFlashDraftModel.from_pretrained(folder).attention_kinds == kinds, changes
    q, k = torch.arange(4, 6), torch.arange(6)
    assert kind_mask(q, k, False, None) is None
    assert kind_mask(q, k, True, None).tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert kind_mask(q, k, True, 2).tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]]
    assert kind_mask(q, k, False, 2).tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]]


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["DFlash2DraftModel"]), "DFlash 2 draft"),
    (dict(rope_scaling={"rope_type": "bogus", "factor": 2.0}), "rope type 'bogus'.*supported"),
    (dict(rope_parameters={"rope_type": "yarn"}, rope_scaling=None), "rope"),
    (dict(hidden_act="nope"), "hidden_act 'nope'"),
    (dict(layer_types=["linear_attention", "full_attention"]), "layer_types"),
])
def test_unsupported_draft_options_are_refused_in_one_line(tmp_path, changes, message):
    folder = _variant_checkpoint(tmp_path / "d", **changes)
    with pytest.raises(UserError, match=message) as err:
        DFlashDraftModel.from_pretrained(folder)
    assert "\n" not in str(err.value)


def test_rope_is_transformers_own(tmp_path):
    """inv_freq and attention scaling are what transformers' rotary init gives the config."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    folder = _variant_checkpoint(tmp_path / "d", rope_scaling=yarn)
    draft = DFlashDraftModel.from_pretrained(folder, dtype=torch.float32)
    hf = Qwen3RotaryEmbedding(Qwen3Config.from_dict(json.loads((folder / "config.json").read_text())))
    assert torch.equal(draft.inv_freq, hf.inv_freq.float())
    assert draft.attention_scaling == hf.attention_scaling != 1.0


def test_dflash2_checkpoint_refused_by_the_cli(tmp_path):
    """One line naming DFlash 2, a non-zero exit and no traceback."""
    from conftest import run_script
    from dflash.model.toy import save_toy_pair

    target, draft = save_toy_pair(tmp_path / "pair")
    cfg = json.loads((draft / "config.json").read_text())
    cfg["architectures"] = ["DFlash2DraftModel"]
    (draft / "config.json").write_text(json.dumps(cfg))
    res = run_script(["benchmark.py", "--model-name-or-path", str(target), "--draft-name-or-path",
                      str(draft), "--dataset", "builtin-chat", "--max-samples", "1",
                      "--max-new-tokens", "4"], timeout=300)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and "DFlash 2" in res.stderr, res.stderr
