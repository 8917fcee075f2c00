"""Replay answers cut off at the generation budget carry no end-of-turn loss (training/data.py)."""

from assistant_forge.core.encoding import IGNORE
from assistant_forge.training.data import encode_records

CHAT = [
    {"role": "user", "content": "Tell me about tea."},
    {"role": "assistant", "content": "Tea is a drink made by steeping leaves"},
]


def _learned(tok, sample: dict) -> str:
    return tok.decode([i for i, lab in zip(sample["input_ids"], sample["labels"]) if lab != IGNORE])


def test_open_ended_replay_answer_learns_its_text_but_not_to_stop(demo_tok):
    closed, open_ = encode_records(demo_tok, [{"messages": CHAT}, {"messages": CHAT, "open_end": True}], 256)
    assert _learned(demo_tok, closed) == "Tea is a drink made by steeping leaves<|im_end|>"
    assert _learned(demo_tok, open_) == "Tea is a drink made by steeping leaves"
    assert open_["input_ids"] == closed["input_ids"]  # same text, only the loss differs


def test_open_end_never_masks_text_when_the_stop_was_already_cut_by_max_length(demo_tok):
    cut = encode_records(demo_tok, [{"messages": CHAT, "open_end": True}], 42)[0]
    full = encode_records(demo_tok, [{"messages": CHAT}], 42)[0]
    assert cut["labels"] == full["labels"]
