"""Loss masking and packing on the real demo tokenizer and model."""

import pytest

from assistant_forge.core.encoding import IGNORE, encode_chat, render_loss_preview
from assistant_forge.training.data import (
    CU_SEQ_K,
    CU_SEQ_Q,
    MAX_Q,
    REAL_TOKENS,
    FlatCollator,
    max_samples_per_row,
    pack,
    row_order,
)

CONVS = [
    [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Forgey, made by Alice."},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ],
    [
        {"role": "user", "content": "你是谁？"},
        {"role": "assistant", "content": "我是Forgey，Alice开发的助手。"},
    ],
]


def test_loss_only_on_assistant_tokens(demo_tok):
    enc = encode_chat(demo_tok, CONVS[1], 512)
    learned = demo_tok.decode([i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE])
    assert learned == "4<|im_end|>6<|im_end|>"
    assert render_loss_preview(demo_tok, enc).count("[") == 2


def test_truncation_that_removes_every_answer_drops_the_sample(demo_tok):
    assert encode_chat(demo_tok, CONVS[0], 5) is None


def test_packing_respects_max_length_and_keeps_samples_whole(demo_tok):
    samples = [encode_chat(demo_tok, c, 512) for c in CONVS * 5]
    # Each sample is 40-60 tokens (the demo template adds its default system prompt).
    rows = pack(samples, 128, packing=True, seed=0)
    assert all(len(r["input_ids"]) <= 128 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(s["input_ids"]) for s in samples)
    assert len(rows) < len(samples)
    unpacked = pack(samples, 128, packing=False, seed=0)
    assert len(unpacked) == len(samples)


def test_best_fit_packing_fills_rows_and_keeps_every_sample_once():
    import random

    rng = random.Random(0)
    # Chat-like lengths: many short identity samples, a long tail of long conversations.
    lengths = [min(2047, int(rng.lognormvariate(5.0, 1.1))) + 1 for _ in range(3000)]
    order, starts = row_order(lengths, 2048, packing=True, seed=1)
    assert sorted(order) == list(range(len(lengths)))
    rows = [sum(lengths[i] for i in order[a:b]) for a, b in zip(starts, starts[1:])]
    assert max(rows) <= 2048
    # Filling rows in data order left ~20% of each row empty on such data; best fit leaves < 2%.
    assert sum(rows) / (len(rows) * 2048) > 0.98
    again, _ = row_order(lengths, 2048, packing=True, seed=1)
    other, _ = row_order(lengths, 2048, packing=True, seed=2)
    assert again == order and other != order


def test_padding_to_a_fixed_length_changes_no_loss(demo_path, demo_tok, torch_one_thread):
    torch = torch_one_thread
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        demo_path, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    rows = pack([encode_chat(demo_tok, c, 512) for c in CONVS], 4096, packing=True, seed=0)
    plain = FlatCollator()(rows)
    collate = FlatCollator(pad_to=256, pad_id=demo_tok.pad_token_id or 0)
    padded = collate(rows)
    real = plain["input_ids"].shape[1]
    assert padded["input_ids"].shape == (1, 256) and padded[REAL_TOKENS] == plain[REAL_TOKENS] == real < 256
    assert (padded["labels"][0, real:] == IGNORE).all()
    assert padded["position_ids"][0, real:].tolist() == list(range(256 - real))
    with torch.no_grad():
        assert model(**padded).loss.item() == pytest.approx(model(**plain).loss.item(), abs=1e-5)


def test_packed_batch_gives_the_same_loss_as_unpacked(demo_path, demo_tok, torch_one_thread):
    torch = torch_one_thread
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        demo_path, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    samples = [encode_chat(demo_tok, c, 512) for c in CONVS]
    rows = pack(samples, 4096, packing=True, seed=0)
    assert len(rows) == 1
    batch = FlatCollator()(rows)
    with torch.no_grad():
        packed = model(**batch).loss.item()
        total, count = 0.0, 0
        for s in samples:
            ids = torch.tensor([s["input_ids"]])
            labels = torch.tensor([s["labels"]])
            n = int((labels[0, 1:] != IGNORE).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
        # Without position ids restarting, samples would see each other and the loss would differ.
        leaky = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.item()
    assert packed == pytest.approx(total / count, abs=1e-4)
    assert abs(leaky - packed) > 1e-3


def test_collator_sends_the_samples_boundaries_in_a_list_of_one_length(demo_tok):
    import datasets
    import torch

    samples = [encode_chat(demo_tok, c, 512) for c in CONVS]
    rows = pack(samples, 4096, packing=True, seed=0)
    starts = [i for i, p in enumerate(rows[0]["position_ids"]) if p == 0]
    real = len(rows[0]["input_ids"])
    padded = FlatCollator(pad_to=512, pad_id=0, boundaries=6)(rows)
    # Three samples, the padding as a fourth, then empty samples up to 6 + 1 entries.
    assert padded[CU_SEQ_Q].dtype == torch.int32
    assert padded[CU_SEQ_Q].tolist() == starts + [real, 512, 512, 512] and padded[MAX_Q] == 512
    assert padded[CU_SEQ_K] is padded[CU_SEQ_Q]
    exact = FlatCollator(boundaries=4)(rows)
    lengths = [b - a for a, b in zip(starts + [real], starts[1:] + [real])]
    assert exact[CU_SEQ_Q].tolist() == starts + [real, real] and exact[MAX_Q] == max(lengths)
    assert CU_SEQ_Q not in FlatCollator(boundaries=2)(rows)  # more samples than planned: SDPA's mask
    # The trainer plans the list's length from the packed rows: the most samples one row holds.
    two_rows = pack(samples, max(len(s["input_ids"]) for s in samples) + 5, packing=True, seed=0)
    counts = [r["position_ids"].count(0) for r in two_rows]
    assert len(two_rows) > 1 and max_samples_per_row(datasets.Dataset.from_list(two_rows)) == max(counts)
    assert max_samples_per_row(datasets.Dataset.from_list(rows)) == 3
