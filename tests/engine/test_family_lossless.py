"""Issue 23, acceptance 1: on every target family, greedy ``spec_generate`` and
``SpeculativeDecoder.generate`` equal ``target.generate`` over 20 prompts (some longer than
the window of 8) x block sizes 4, 8, 16, with and without stop tokens, with a draft trained
briefly on the target's own greedy continuations (tests/engine/families.py), so that
proposals are often accepted and often rejected. ``-s`` prints tau per family."""
import pytest
import torch

from families import FAMILIES, N_NEW, family_case
from dflash.decoding.loop import SpeculativeDecoder

BLOCKS = (4, 8, 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_greedy_lossless_trained_draft(family):
    target, draft, prompts, refs = family_case(family)
    dec = SpeculativeDecoder(target, draft)  # engine auto: what the family needs
    taus = {b: [] for b in BLOCKS}
    for i, (ids, ref) in enumerate(zip(prompts, refs)):
        for j, b in enumerate(BLOCKS):
            res = dec.generate(ids, N_NEW, block_size=b)
            assert res.output_ids == ref, (i, b)
            taus[b] += [c.tau for c in res.cycles]
            # a stop id from the reference: ends where target.generate with that eos would
            stop = ref[(3 + 5 * j + i) % len(ref)]
            want = ref[:ref.index(stop) + 1]
            out = draft.spec_generate(target, ids, N_NEW, stop_token_ids=[stop], block_size=b)
            assert out[0, ids.shape[1]:].tolist() == want, (i, b, "stop")
        if i % 3:  # the other pairing of API and stop on every third prompt, blocks in turn
            continue
        b = BLOCKS[i // 3 % 3]
        out = draft.spec_generate(target, ids, N_NEW, block_size=b)
        assert out[0, ids.shape[1]:].tolist() == ref, (i, b)
        stop = ref[(7 + i) % len(ref)]
        res = dec.generate(ids, N_NEW, block_size=b, stop_token_ids=[stop])
        assert res.output_ids == ref[:ref.index(stop) + 1] and res.stopped, (i, b, "stop")
    eos = target.generate(prompts[0], attention_mask=torch.ones_like(prompts[0]),
                          max_new_tokens=N_NEW, do_sample=False, pad_token_id=0,
                          eos_token_id=refs[0][3])[0, prompts[0].shape[1]:].tolist()
    assert eos == refs[0][:refs[0].index(refs[0][3]) + 1]  # the stop semantics checked above
    mean = {b: sum(t) / len(t) for b, t in taus.items()}
    print(f"\ntau {family}: " + "  ".join(f"b{b} {mean[b]:.2f}" for b in BLOCKS))
    # trained but brief: accepted often (tau > 1.5), rejected often (well below the block)
    assert mean[16] > 1.5 and all(mean[b] < 0.8 * b for b in BLOCKS), mean
