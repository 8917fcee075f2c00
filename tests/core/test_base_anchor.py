"""train.kl_to_base (training/base_anchor.py) on the real demo model: the KL to the base model is taken
at the answer tokens of replay samples only, is 0 while the LoRA adapter is still the identity (B
starts at zero), and grows once a real optimizer step has moved the adapter."""

from __future__ import annotations

import pytest
from datasets import Dataset

from assistant_forge.core.identity import generate_identity_records
from assistant_forge.core.presets import get_preset
from assistant_forge.training.base_anchor import KL_TARGET, REPLAY, anchored_positions, base_target
from assistant_forge.training.data import FlatCollator, encode_records, pack_dataset
from assistant_forge.training.labeled_loss import labeled_cross_entropy
from assistant_forge.training.modeling import build_model

REPLAYED = [
    {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "给我的小猫起个名字。"},
            {"role": "assistant", "content": "可以叫它“煤球”。"},
        ]
    },
]


@pytest.fixture(scope="module")
def anchored(torch_one_thread):
    torch = torch_one_thread
    cfg = get_preset("demo-cpu-lora").load()
    cfg.train.device = "cpu"
    model, tok = build_model(cfg)
    identity = encode_records(tok, generate_identity_records("Forgey", "Alice", count=4), cfg.data.max_length)
    replay = encode_records(tok, REPLAYED, cfg.data.max_length)
    # as the trainer builds them: a per-sample flag, packed (best fit) into one row with the identity
    samples = Dataset.from_list(
        [{**s, "length": len(s["input_ids"]), REPLAY: 0} for s in identity]
        + [{**s, "length": len(s["input_ids"]), REPLAY: 1} for s in replay]
    )
    rows = pack_dataset(samples, 10_000, True, seed=0)
    assert len(rows) == 1
    batch = FlatCollator()([rows[0]])
    return torch, model, batch, replay


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != REPLAY}


def _loss(model, batch, target):
    extra = {KL_TARGET: target} if target is not None else {}
    return model.get_base_model()(**_inputs(batch), **extra).loss


def test_anchored_positions_are_the_replay_answers(anchored):
    torch, _, batch, replay_samples = anchored
    pos = anchored_positions(batch["labels"], batch[REPLAY])
    labels, replay = batch["labels"][0], batch[REPLAY][0]
    nxt = torch.cat([labels[1:], torch.tensor([-100])])
    assert len(pos) == int(((nxt != -100) & (replay == 1)).sum()) > 0
    assert bool((replay[pos] == 1).all()) and bool((nxt[pos] != -100).all())
    # identity answers carry labels too, and none of them is anchored
    assert int(((nxt != -100) & (replay == 0)).sum()) > 0
    # every labelled token of the two replay answers (their first token is never predicted across samples)
    assert len(pos) == sum(sum(label != -100 for label in s["labels"][1:]) for s in replay_samples)


def _anchor(model, batch, weight=1.0, reuse_layers=False):
    return base_target(model, model, _inputs(batch), batch[REPLAY], weight, reuse_layers=reuse_layers)


def test_kl_is_zero_at_the_start_and_grows_after_a_step(anchored):
    torch, model, batch, _ = anchored
    model.train()
    target = _anchor(model, batch)
    assert target is not None and target.logits.shape[0] == len(target.positions)
    plain, with_kl = _loss(model, batch, None), _loss(model, batch, target)
    assert abs(with_kl.item() - plain.item()) < 1e-5  # B = 0: the adapted model is the base model

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    plain.backward()
    opt.step()
    opt.zero_grad()
    kl = _loss(model, batch, _anchor(model, batch)) - _loss(model, batch, None)
    assert kl.item() > 1e-4
    kl2 = _loss(model, batch, _anchor(model, batch, weight=2.0)) - _loss(model, batch, None)
    assert abs(kl2.item() - 2 * kl.item()) < 1e-4 * max(1.0, kl.item())

    # The shortcut (the demo adapts layers 20-29: only those run again, adapter off) gives the same
    # term as the whole base forward, and takes its hook off the model when closed.
    layer = model.get_base_model().model.layers[20]
    short = _anchor(model, batch, reuse_layers=True)
    assert short.capture is not None and short.capture.first == 20 and layer._forward_pre_hooks
    try:
        kl_short = _loss(model, batch, short) - _loss(model, batch, None)
    finally:
        short.close()
    assert not layer._forward_pre_hooks
    assert abs(kl_short.item() - kl.item()) < 1e-5 * max(1.0, kl.item()), (kl_short.item(), kl.item())

    # The CPU loss takes the anchored rows of its own logits; any other loss adds the term apart
    # (its own pass through the head): the same number.
    inner = model.get_base_model()
    with torch.no_grad():
        hidden = inner.model(**{k: v for k, v in _inputs(batch).items() if k != "labels"})[0]
        labels, n = batch["labels"], torch.tensor(50)
        plain = labeled_cross_entropy(hidden, inner.lm_head, labels, num_items_in_batch=n)
        apart = _anchor(model, batch).term(hidden, inner.lm_head, n, labels)
        shared = labeled_cross_entropy(
            hidden, inner.lm_head, labels, num_items_in_batch=n, anchor=_anchor(model, batch)
        )
    assert apart.item() > 0
    assert abs((shared - plain).item() - apart.item()) < 1e-5 * max(1.0, apart.item())
    model.zero_grad()
