"""sliding_window / blockwise / extend_positions on tiny random-config models (no downloads).

Each patched model is compared with the same weights run through a float64 dense attention
with the explicit mask written from the method's definition (reference_mask from the kernel
tests), on padded batches and through generate() with a KV cache."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import tiny_model
from test_kernel_sliding import reference_mask

import surgeon
from surgeon.attention import interface
from surgeon.errors import SurgeonError

class ExplicitMaskReference:
    """Dense float64 attention with an explicit (B, H, n_q, n_k) mask: the reference."""

    name = "reference"

    def __init__(self, mask_fn):
        self.mask_fn = mask_fn

    def forward_attention(self, module, query, key, value, *, key_padding_mask, scaling, dropout, causal, **kw):
        b, h, n_q, _ = query.shape
        n_k = key.shape[2]
        mask = self.mask_fn(b, h, n_q, n_k, key_padding_mask, causal, kw)  # (B, H, n_q, n_k)
        k = key.repeat_interleave(h // key.shape[1], dim=1).double()
        v = value.repeat_interleave(h // value.shape[1], dim=1).double()
        s = (query.double() @ k.transpose(-1, -2)) * scaling
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
        return (p @ v).to(query.dtype)


def sliding_mask_fn(windows, dilation=(1,), global_tokens=()):
    """windows: {module: window}; returns mask_fn closed over one module's window."""

    def for_window(window):
        def fn(b, h, n_q, n_k, pad, causal, kw):
            out = []
            for bi in range(b):
                glob = torch.zeros(n_k, dtype=torch.bool)
                glob[[p for p in global_tokens if p < n_k]] = True
                gam = kw.get("global_attention_mask")
                if gam is not None:
                    glob[: gam.shape[1]] |= gam[bi].bool()
                m = reference_mask(n_q, n_k, window, causal, list(dilation),
                                   glob if glob.any() else None, pad[bi] if pad is not None else None)
                out.append(m.repeat_interleave(h // m.shape[0], dim=0))
            return torch.stack(out)

        return fn

    return for_window


def blockwise_mask_fn(block_size):
    def fn(b, h, n_q, n_k, pad, causal, kw):
        q_pos = torch.arange(n_k - n_q, n_k)[:, None]
        k_pos = torch.arange(n_k)[None, :]
        m = (q_pos // block_size) == (k_pos // block_size)
        if causal:
            m = m & (k_pos <= q_pos)
        m = m[None, None].expand(b, h, n_q, n_k)
        if pad is not None:
            m = m & pad[:, None, None, :]
        return m

    return fn


def attach_reference(model, per_module_fn):
    for path in surgeon.modelmap.ModelMap(model).role_table()["attn"]:
        module = model.get_submodule(path)
        interface.attach(model, module, ExplicitMaskReference(per_module_fn(path)))


def recipe(do, select=None, **with_):
    return {"surgeon": 1, "rules": [{"do": do, "select": select or {"role": "attn"}, "with": with_}]}


def padded_batch(seq=24, vocab=96, left=False, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, seq), generator=g)
    mask = torch.ones_like(ids)
    if left:
        mask[1, :7] = 0
    else:
        mask[1, -7:] = 0
    return ids, mask


def real(hidden, mask):
    return hidden[mask.bool()]


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("left", [False, True])
def test_sliding_window_matches_explicit_mask(family, left):
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    globals_ = [0] if family == "bert" else []
    surgeon.patch(model, recipe("sliding_window", window=[4, 6, 8], dilation=[1, 2], global_tokens=globals_))
    windows = {f"{p}": w for p, w in zip(surgeon.modelmap.ModelMap(ref).role_table()["attn"], [4, 6, 8])}
    attach_reference(ref, lambda path: sliding_mask_fn(windows, (1, 2), globals_)(windows[path]))
    ids, mask = padded_batch(left=left)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        theirs = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(real(ours, mask), real(theirs, mask), atol=1e-5, rtol=0)


def test_per_call_global_attention_mask_bert():
    model = tiny_model("bert")
    ref = copy.deepcopy(model)
    surgeon.patch(model, recipe("sliding_window", window=4))
    attach_reference(ref, lambda path: sliding_mask_fn({}, (1,), ())(4))
    ids, mask = padded_batch()
    gam = torch.zeros(2, 24, dtype=torch.long)
    gam[0, [0, 9]] = 1
    gam[1, 3] = 1
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, global_attention_mask=gam).last_hidden_state
        theirs = ref(input_ids=ids, attention_mask=mask, global_attention_mask=gam).last_hidden_state
        plain = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(real(ours, mask), real(theirs, mask), atol=1e-5, rtol=0)
    assert (ours - plain).abs().max() > 1e-3  # the per-call mask changed something


def test_window_growth_and_full_window_equals_dense():
    model = tiny_model("bert")
    surgeon.patch(model, recipe("sliding_window", window={"start": 4, "end": 8}))
    attn = [model.get_submodule(p) for p in surgeon.modelmap.ModelMap(model).role_table()["attn"]]
    assert [interface.variant_of(m).window for m in attn] == [4, 6, 8]

    dense, patched = tiny_model("bert"), tiny_model("bert")
    surgeon.patch(patched, recipe("sliding_window", window=64, global_tokens=[0]))
    ids, mask = padded_batch()
    with torch.no_grad():
        a = patched(input_ids=ids, attention_mask=mask).last_hidden_state
        b = dense(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(real(a, mask), real(b, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_blockwise_matches_explicit_mask(family):
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    surgeon.patch(model, recipe("blockwise", block_size=5))  # 24 tokens: padded to 25
    attach_reference(ref, lambda path: blockwise_mask_fn(5))
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        theirs = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(real(ours, mask), real(theirs, mask), atol=1e-5, rtol=0)


def test_blockwise_permutations_on_bert_change_output_and_run():
    a, b = tiny_model("bert"), tiny_model("bert")
    surgeon.patch(a, recipe("blockwise", block_size=6, permutations=2))
    surgeon.patch(b, recipe("blockwise", block_size=6, permutations=[[0, 1, 2, 3], [1, 0, 3, 2]]))
    ids, mask = padded_batch()
    with torch.no_grad():
        ya, yb = a(input_ids=ids).last_hidden_state, b(input_ids=ids).last_hidden_state
    assert torch.isfinite(ya).all() and (ya - yb).abs().max() > 1e-4


@pytest.mark.parametrize("do, with_, ref_fn", [
    ("sliding_window", {"window": 3, "global_tokens": [0]}, lambda: sliding_mask_fn({}, (1,), (0,))(3)),
    ("blockwise", {"block_size": 4}, lambda: blockwise_mask_fn(4)),
])
def test_generate_with_cache_matches_explicit_mask(do, with_, ref_fn):
    model = tiny_model("llama")
    ref = copy.deepcopy(model)
    surgeon.patch(model, recipe(do, **with_))
    attach_reference(ref, lambda path: ref_fn())
    ids, mask = padded_batch(seq=9, left=True)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    ours = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    theirs = ref.generate(input_ids=ids, attention_mask=mask, **kwargs)
    dense = tiny_model("llama").generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, dense)  # the window really restricted attention


@pytest.mark.parametrize("family, table, offset", [
    ("bert", "embeddings.position_embeddings", 0),
    ("roberta", "roberta.embeddings.position_embeddings", 2),
    ("gpt2", "transformer.wpe", 0),
])
def test_extend_positions_tiles_table(family, table, offset):
    model = tiny_model(family)
    old = model.get_submodule(table).weight.detach().clone()
    surgeon.patch(model, recipe("extend_positions", {"role": "embed"}, length=150))
    new = model.get_submodule(table).weight
    trained = old.shape[0] - offset
    assert new.shape[0] == 150 + offset
    torch.testing.assert_close(new[:offset], old[:offset])
    for p in (0, trained - 1, trained, 2 * trained + 5, 149):
        torch.testing.assert_close(new[offset + p], old[offset + p % trained])
    cfg = model.config
    assert (cfg.n_positions if family == "gpt2" else cfg.max_position_embeddings - offset) == 150
    again = tiny_model(family)  # re-applying the recipe re-creates it exactly (how a diff loads)
    surgeon.patch(again, recipe("extend_positions", {"role": "embed"}, length=150))
    assert torch.equal(again.get_submodule(table).weight, new)
    ids = torch.randint(3, 90, (1, 140))
    with torch.no_grad():
        out = model(input_ids=ids)
    assert torch.isfinite(out[0]).all()


def test_extend_positions_refuses_a_table_that_lora_already_adapts():
    # LoRA's factor on an embedding has one row per position: extending under it broke the
    # forward (index out of range); now the order is refused up front, in either recipe layout
    lora = {"do": "lora", "select": {"role": "embed"}, "with": {"r": 4}}
    extend = {"do": "extend_positions", "select": {"role": "embed"}, "with": {"length": 150}}
    model = tiny_model("gpt2")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(SurgeonError, match=r"transformer.wpe already has a LoRA adapter \(rule 1\)"):
        surgeon.patch(model, {"surgeon": 1, "rules": [lora, extend]})
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # nothing applied
    surgeon.patch(model, {"surgeon": 1, "rules": [lora]})
    with pytest.raises(SurgeonError, match="already has a LoRA adapter \\(from an earlier recipe\\)"):
        surgeon.patch(model, {"surgeon": 1, "rules": [extend]})
    ok = tiny_model("gpt2")  # extend first, then adapt the longer table: works
    surgeon.patch(ok, {"surgeon": 1, "rules": [extend, lora]})
    with torch.no_grad():
        assert torch.isfinite(ok(input_ids=torch.randint(3, 90, (1, 140)))[0]).all()


def test_extend_then_sliding_window_on_long_input():
    model = tiny_model("bert")
    surgeon.patch(model, {"surgeon": 1, "rules": [
        {"do": "extend_positions", "select": {"role": "embed"}, "with": {"length": 200}},
        {"do": "sliding_window", "select": {"role": "attn"}, "with": {"window": 16, "global_tokens": [0]}},
    ]})  # fmt: skip
    ref = tiny_model("bert")
    surgeon.patch(ref, recipe("extend_positions", {"role": "embed"}, length=200))
    attach_reference(ref, lambda path: sliding_mask_fn({}, (1,), (0,))(16))
    ids = torch.randint(3, 90, (2, 180))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state,
                                   atol=1e-5, rtol=0)


def test_report_cost():
    model = tiny_model("bert")
    surgery = surgeon.patch(model, recipe("sliding_window", window=8))
    cost = surgery.report(seq_len=1024).to_dict()["attention_cost"]["modules"]
    assert len(cost) == 3
    for row in cost:
        assert row["variant"] == "sliding_window"
        # ±4 around each of 1024 queries, less the 2 × (4+3+2+1) keys beyond the two ends
        assert row["dense_flops"] / row["flops"] == pytest.approx(1024 * 1024 / (1024 * 9 - 20))


def test_band_pairs_counts_every_pair_inside_the_sequence():
    from surgeon.attention.variants_local import band_pairs

    for n in range(1, 10):
        for lo in range(-11, 1):
            for hi in range(0, 11):
                brute = sum(1 for q in range(n) for k in range(n) if lo <= q - k <= hi)
                assert band_pairs(n, lo, hi) == brute, (n, lo, hi)


@pytest.mark.parametrize("rule, msg", [
    (recipe("sliding_window", {"role": "mlp"}, window=4), "not a self-attention module"),
    (recipe("sliding_window", window=[4, 4]), "lists 2 values"),
    (recipe("sliding_window", window=4, dilation=[1, 2, 3]), "do not divide"),
    (recipe("sliding_window", window=4, global_tokens=[64]), "out of range"),
    (recipe("extend_positions", {"role": "embed"}, length=10), "already covers"),
])
def test_bad_input_bert(rule, msg):
    with pytest.raises(SurgeonError, match=msg) as info:
        surgeon.patch(tiny_model("bert"), rule)
    assert "Bert" in str(info.value) or "embeddings" in str(info.value)


def test_bad_input_other_families():
    with pytest.raises(SurgeonError, match="causal; only the identity"):
        surgeon.patch(tiny_model("llama"), recipe("blockwise", block_size=4, permutations=2))
    with pytest.raises(SurgeonError, match="no learned absolute position table"):
        surgeon.patch(tiny_model("llama"), recipe("extend_positions", {"role": "embed"}, length=500))
    with pytest.raises(SurgeonError, match="cross-attention"):
        surgeon.patch(tiny_model("bart"), recipe("sliding_window", {"role": "xattn"}, window=4))
    cfg = transformers.DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=48, vocab_size=96, max_position_embeddings=64)
    with pytest.raises(SurgeonError, match="DisentangledSelfAttention.*AttentionInterface"):
        # DeBERTa's attention is not routed through the interface (its own eager code)
        surgeon.patch(transformers.DebertaV2Model(cfg),
                      recipe("sliding_window", {"type": "DisentangledSelfAttention"}, window=4))
