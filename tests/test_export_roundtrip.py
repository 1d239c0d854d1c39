"""One diff, every format: the PEFT adapter on its base (loaded by PEFT), the merged or native
checkpoint (loaded by plain transformers with surgeon blocked) and the self-contained surgeon
directory give the same outputs as the patched model."""

from __future__ import annotations

import pytest
import torch
from conftest import first_output, tiny_inputs
from export_support import make_diff, run_plain, save_base

import surgeon
from surgeon.export import export_merged
from surgeon.export.self_contained import export_self_contained
from surgeon.peft_io import export_peft

LORA = {
    "do": "lora",
    "select": {"role": ["attn.q", "attn.k", "attn.v", "attn.o"]},
    "with": {"r": 4, "alpha": 8},
}
SLIDING = {"do": "sliding_window", "select": {"role": "attn"}, "with": {"window": 5}}


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_peft_merged_and_surgeon_formats_agree(tmp_path, family):
    from peft import PeftModel

    base = save_base(family, str(tmp_path / "base"))
    diff = make_diff(base, str(tmp_path / "diff"), {"surgeon": 1, "rules": [LORA]})
    export_peft(diff, str(tmp_path / "peft"))
    export_merged(diff, str(tmp_path / "hf"), progress=False)
    export_self_contained(diff, str(tmp_path / "surgeon"), progress=False)
    inputs = tiny_inputs(family, seq=16)
    peft_model = PeftModel.from_pretrained(surgeon.load_model(base)[0], str(tmp_path / "peft")).eval()
    with torch.no_grad():
        want = first_output(surgeon.load(base, diff)(**inputs))
        by_peft = first_output(peft_model(**inputs))
        by_surgeon = first_output(surgeon.load(str(tmp_path / "surgeon"))(**inputs))
    plain = run_plain({"hf": (str(tmp_path / "hf"), inputs)}, str(tmp_path))["hf"]
    assert _close(by_peft, want) and _close(plain, want) and _close(by_surgeon, want)


def test_native_and_surgeon_formats_of_an_attention_diff_agree(tmp_path):
    """Mistral (plain transformers) and the surgeon directory: same logits, same greedy tokens."""
    base = save_base("llama", str(tmp_path / "base"))
    diff = make_diff(base, str(tmp_path / "diff"), {"surgeon": 1, "rules": [LORA, SLIDING]})
    summary = export_merged(diff, str(tmp_path / "native"), progress=False)
    assert summary["architecture"] == "MistralForCausalLM"
    export_self_contained(diff, str(tmp_path / "surgeon"), progress=False)
    inputs = tiny_inputs("llama", seq=30)
    plain = run_plain({"generate": (str(tmp_path / "native"), inputs)}, str(tmp_path))
    model = surgeon.load(str(tmp_path / "surgeon"))
    prompt = inputs["input_ids"][:1, :6]
    with torch.no_grad():
        logits = first_output(model(**inputs))
    tokens = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False, pad_token_id=0
    )
    assert _close(plain["generate"], logits)
    assert torch.equal(plain["generate:tokens"], tokens)
