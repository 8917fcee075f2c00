"""QLoRA on the CPU trains the same after the model has generated in eval mode (sample and replay answers).

bitsandbytes 0.50 repacks a 4-bit layer's weights for CPU inference the first time it runs in eval
mode (on CPUs with AVX512-BF16) and keeps them so; training then goes through a kernel without
autograd. forge turns that off for CPU QLoRA (training/modeling.keep_4bit_trainable_on_cpu). Checked
on the tiny Qwen2.5 family model, whose q/k/v projections have biases (the repacked path fails outright
there), and on the tiny Mistral, which has none (the repacked path silently drops gradients there).
"""

from __future__ import annotations

import pytest
from families import family_model

from assistant_forge.core.config import ForgeConfig
from assistant_forge.training.data import FlatCollator, encode_records, pack
from assistant_forge.training.modeling import build_model

CHAT = [
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am Forgey, an assistant made by Alice."},
]


def _lora_grads(model, batch) -> dict:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("family", "ckpt"), [("qwen2_5", True), ("mistral_v3", False)])
def test_qlora_gradients_unchanged_by_an_eval_mode_generation(
    torch_one_thread, family: str, ckpt: bool
) -> None:
    torch = torch_one_thread
    cfg = ForgeConfig()
    cfg.model.path = str(family_model(family))
    cfg.model.chat_template = family
    cfg.lora.method, cfg.lora.dropout = "qlora", 0.0
    cfg.train.device, cfg.train.gradient_checkpointing = "cpu", ckpt
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    rows = pack(encode_records(tok, [{"messages": CHAT}], 128), 128, True, seed=0)
    batch = FlatCollator()([rows[0]])
    model.train()
    before = _lora_grads(model, batch)
    model.eval()
    prompt = tok.apply_chat_template(
        CHAT[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        model.generate(**prompt, max_new_tokens=2, do_sample=False)
    model.train()
    after = _lora_grads(model, batch)
    assert before.keys() == after.keys() and before
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-6, msg=name)
