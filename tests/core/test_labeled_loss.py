"""The CPU trainer's loss computes logits only at labelled positions (training/labeled_loss.py) and must
equal transformers' own loss and gradients on the real demo model and a real packed batch."""

from __future__ import annotations

import pytest

from assistant_forge.core.identity import generate_identity_records
from assistant_forge.core.presets import get_preset
from assistant_forge.training.data import FlatCollator, encode_records, pack
from assistant_forge.training.modeling import build_model

GENERIC = [
    {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "怎样泡一杯好喝的绿茶？"},
            {"role": "assistant", "content": "用80度左右的水冲泡，先温杯，再放茶叶。"},
        ]
    },
]


@pytest.fixture(scope="module")
def demo_lora(torch_one_thread):
    cfg = get_preset("demo-cpu-lora").load()
    cfg.train.device = "cpu"
    model, tok = build_model(cfg)
    records = generate_identity_records("Forgey", "Alice", count=6) + GENERIC
    samples = encode_records(tok, records, cfg.data.max_length)
    rows = pack(samples, cfg.data.max_length, True, seed=0)
    batch = FlatCollator()([rows[0]])
    return torch_one_thread, model, batch


def _loss_and_grads(torch, model, batch, fast: bool, num_items=None):
    base = model.get_base_model()
    forward = base.forward if fast else base._forge_plain_forward
    model.train()
    model.zero_grad()
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    out = forward(**batch, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize("num_items", [None, 37])
def test_same_loss_and_gradients_as_the_full_logits(demo_lora, num_items):
    torch, model, batch = demo_lora
    labels = batch["labels"][0]
    labelled = int((labels != -100).sum())
    assert 0 < labelled < len(labels) * 0.8  # a real packed row: many positions carry no loss
    n = None if num_items is None else torch.tensor(num_items)
    ref, ref_grads = _loss_and_grads(torch, model, batch, fast=False, num_items=n)
    got, got_grads = _loss_and_grads(torch, model, batch, fast=True, num_items=n)
    assert ref.logits is not None and got.logits is None  # the patched forward really took the short route
    assert abs(got.loss.item() - ref.loss.item()) < 1e-5, (got.loss.item(), ref.loss.item())
    assert got_grads.keys() == ref_grads.keys() and ref_grads
    for name, g in ref_grads.items():
        assert torch.allclose(got_grads[name], g, rtol=1e-4, atol=1e-6), name


def test_generation_and_eval_keep_the_full_forward(demo_lora):
    torch, model, batch = demo_lora
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape  # logits at every position, as before
    model.train()
    with torch.no_grad():  # no gradients (e.g. sample chats during training): also the full forward
        assert model(input_ids=batch["input_ids"]).logits is not None
