"""Generation with a causal sliding window keeps per patched layer only the keys its window can
still reach (surgeon/attention/window_cache.py), and gives the same tokens as a full cache and as
a float64 dense reference masked to the window (test_attention_local.ExplicitMaskReference).

What the cache holds is transformers' DynamicSlidingWindowLayer rule: after a prompt of P tokens
and N generated ones the model has run P + N - 1 positions (the last token is never fed back) and
a window-w layer keeps the last min(P + N - 1, w - 1) of them; a dense layer keeps all P + N - 1.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import transformers
from conftest import tiny_model
from test_attention_local import attach_reference, padded_batch, recipe, sliding_mask_fn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

import surgeon
import surgeon.assets
from surgeon.attention.window_cache import window_cache
from surgeon.errors import SurgeonError

NEW = 14
GREEDY = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate(model, ids, mask, **kwargs):
    out = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **GREEDY, **kwargs)
    return out.sequences, out.cache


def kept(cache) -> list[int]:
    return [layer.keys.shape[2] for layer in cache.layers]


def patched_and_reference(family, rule_recipe, window, dilation=(1,), global_tokens=()):
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    surgeon.patch(model, rule_recipe)
    attach_reference(ref, lambda path: sliding_mask_fn({}, dilation, global_tokens)(window))
    return model, ref


@pytest.mark.parametrize("seq", [3, 11], ids=["prompt-shorter-than-window", "prompt-longer"])
def test_window_cache_tokens_equal_full_cache_and_masked_dense(seq):
    window = 6
    model, ref = patched_and_reference("llama", recipe("sliding_window", window=window), window)
    ids, mask = padded_batch(seq=seq, left=True)
    if seq < 7:
        mask[1, :2] = 0  # padded_batch pads 7 on the left; keep a real token in a short prompt
        mask[1, 2:] = 1
    windowed, cache = generate(model, ids, mask)
    full, full_cache = generate(model, ids, mask, cache=DynamicCache())
    reference, _ = generate(ref, ids, mask)
    dense, _ = generate(tiny_model("llama"), ids, mask)
    assert torch.equal(windowed, full) and torch.equal(full, reference)
    assert not torch.equal(windowed, dense)  # the window really restricted attention
    ran = seq + NEW - 1
    assert all(isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers)
    assert kept(cache) == [min(ran, window - 1)] * 3
    assert kept(full_cache) == [ran] * 3  # a cache the caller passes is used as it is


def test_dense_layers_keep_everything_and_windows_differ_by_layer():
    # layers 0-1 windowed (3 and 5), layer 2 left dense: the sliding layers all keep the larger
    # window (one padding mask serves the cache), the dense one keeps every position
    rules = {"surgeon": 1, "rules": [
        {"do": "sliding_window", "select": {"role": "attn", "layers": [layer]}, "with": {"window": window}}
        for layer, window in ((0, 3), (1, 5))
    ]}  # fmt: skip
    model = tiny_model("llama")
    ref = copy.deepcopy(model)
    surgeon.patch(model, rules)
    attn = surgeon.modelmap.ModelMap(ref).role_table()["attn"]
    windows = dict(zip(attn[:2], [3, 5]))
    attach_reference(ref, lambda path: sliding_mask_fn({})(windows.get(path, 10_000)))
    ids, mask = padded_batch(seq=9, left=True)
    windowed, cache = generate(model, ids, mask)
    reference, _ = generate(ref, ids, mask)
    assert torch.equal(windowed, reference)
    assert [type(layer) for layer in cache.layers] == [DynamicSlidingWindowLayer] * 2 + [DynamicLayer]
    assert kept(cache) == [4, 4, 9 + NEW - 1]


def test_dilation_keeps_its_reach():
    # window 3, dilations 1 and 2 per head group: offsets up to (3 - 1)·2 = 4 back, so 4 kept
    model, ref = patched_and_reference("llama", recipe("sliding_window", window=3, dilation=[1, 2]), 3, (1, 2))
    ids, mask = padded_batch(seq=10, left=True)
    windowed, cache = generate(model, ids, mask)
    reference, _ = generate(ref, ids, mask)
    assert torch.equal(windowed, reference)
    assert kept(cache) == [4] * 3


def test_global_tokens_keep_the_full_cache():
    model, ref = patched_and_reference("llama", recipe("sliding_window", window=3, global_tokens=[0]), 3,
                                       global_tokens=(0,))  # fmt: skip
    ids, mask = padded_batch(seq=9, left=True)
    windowed, cache = generate(model, ids, mask)
    assert torch.equal(windowed, generate(ref, ids, mask)[0])
    assert kept(cache) == [9 + NEW - 1] * 3


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_other_decoder_families(family):
    model, ref = patched_and_reference(family, recipe("sliding_window", window=4), 4)
    ids, mask = padded_batch(seq=10, left=True)
    windowed, cache = generate(model, ids, mask)
    assert torch.equal(windowed, generate(ref, ids, mask)[0])
    assert kept(cache) == [3] * len(cache.layers)


def test_a_cache_too_small_or_static_is_refused_in_one_line():
    model = tiny_model("llama")
    surgeon.patch(model, recipe("sliding_window", window=6))
    ids, mask = padded_batch(seq=9, left=True)
    small = DynamicCache()
    small.layers = [DynamicSlidingWindowLayer(sliding_window=3) for _ in range(3)]
    with pytest.raises(SurgeonError, match="keeps a window of 3 at layer 0, but its patched attention needs a window of 6"):
        generate(model, ids, mask, cache=small)
    with pytest.raises(SurgeonError, match="static cache"):
        generate(model, ids, mask, cache_implementation="static")
    wide = window_cache(model)  # a windowed cache the caller built (or wider) is accepted
    assert torch.equal(generate(model, ids, mask, cache=wide)[0], generate(model, ids, mask)[0])


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_a_copy_builds_its_cache_from_its_own_layers(clone):
    model = tiny_model("llama")
    surgeon.patch(model, recipe("sliding_window", window=6))
    twin = clone(model)
    assert twin._prepare_cache_for_generation.model is twin
    twin.model.layers[0].self_attn.surgeon_attention.window = 3  # the copy's own variant decides
    ids, mask = padded_batch(seq=9, left=True)
    assert kept(generate(twin, ids, mask)[1]) == [5] * 3  # every sliding layer keeps the largest need
    twin.model.layers[1].self_attn.surgeon_attention.window = 3
    twin.model.layers[2].self_attn.surgeon_attention.window = 3
    assert kept(generate(twin, ids, mask)[1]) == [2] * 3
    assert kept(generate(model, ids, mask)[1]) == [5] * 3


def test_unpatched_and_lora_models_keep_transformers_cache():
    model = tiny_model("llama")
    surgeon.patch(model, recipe("lora", {"role": ["attn.q", "attn.v"]}, r=2))
    ids, mask = padded_batch(seq=9, left=True)
    assert kept(generate(model, ids, mask)[1]) == [9 + NEW - 1] * 3


@pytest.mark.slow
def test_smollm2_window_cache_gives_todays_tokens():
    # the real decoder (30 layers, GQA 9/3): 70 positions at window 16, the example
    from test_smollm2 import PROMPT, _missing

    if _missing():
        pytest.skip(_missing())
    path = surgeon.assets.smollm2()
    model, _ = surgeon.load_model(path)
    surgeon.patch(model, recipe("sliding_window", window=16))
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok([PROMPT, "Hello"], return_tensors="pt", padding=True, padding_side="left")
    n = 70 - ids["input_ids"].shape[1] + 1
    options = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": tok.eos_token_id,
               "return_dict_in_generate": True}
    with torch.no_grad():
        windowed = model.generate(**ids, **options)
        full = model.generate(**ids, cache=DynamicCache(), **options)
    assert torch.equal(windowed.sequences, full.sequences)
    assert kept(windowed.cache) == [15] * 30 and kept(full.cache) == [70] * 30
