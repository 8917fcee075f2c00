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


def test_replay_openings_are_the_first_tokens_of_each_answer_and_never_stop(demo_tok):
    from assistant_forge.training.data import replay_openings

    zh = [
        {"role": "user", "content": "给小猫起个名字。"},
        {"role": "assistant", "content": "叫它“小橘”怎么样？"},
    ]
    records = [{"messages": CHAT}, {"messages": zh}]
    assert replay_openings(records, 0, demo_tok) == []
    en, cn = replay_openings(records, 3, demo_tok)
    assert en["open_end"] and cn["open_end"] and en["messages"][0] == CHAT[0] and cn["messages"][0] == zh[0]
    for rec, full in ((en, CHAT), (cn, zh)):
        short = rec["messages"][1]["content"]
        # A prefix of the answer, at most three tokens: a cut inside a Chinese character's bytes drops
        # the broken tail rather than training a replacement character.
        assert short and full[1]["content"].startswith(short) and "\ufffd" not in short
        assert 0 < len(demo_tok(short, add_special_tokens=False)["input_ids"]) <= 3
        # No end of turn is learnt after the cut: only the opening's own text.
        assert _learned(demo_tok, encode_records(demo_tok, [rec], 256)[0]) == short
