"""Chat templates: the shipped official ones render the golden strings, the loss mask is read off the
rendering for every family, and a named template that differs from the model's own is refused."""

import copy
import json
from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from assistant_forge.core.config import parse_config
from assistant_forge.core.encoding import IGNORE, encode_chat, end_of_turn, load_tokenizer, stop_token_ids
from assistant_forge.core.templates import resolve, shipped
from assistant_forge.errors import ForgeError

GOLDEN = json.loads((Path(__file__).parents[1] / "fixtures" / "templates" / "golden.json").read_text())
# Each family (golden.json's key is also the shipped template's name) and its end-of-turn text.
END = {
    "qwen2_5": "<|im_end|>",
    "llama3_1": "<|eot_id|>",
    "mistral_v3": "</s>",
    "internlm2_5": "<|im_end|>",
    "yi_1_5": "<|im_end|>",
}
FAMILIES = sorted(END)
SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "<|startoftext|>",
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("conv", ["a", "b", "c", "d"])
def test_shipped_templates_render_the_golden_strings(family, conv):
    spec = GOLDEN["families"][family]
    c = GOLDEN["conversations"][conv]
    out, _ = render_jinja_template(
        conversations=[c["messages"]],
        chat_template=shipped(family),
        add_generation_prompt=c["add_generation_prompt"],
        **spec["template_variables"],
    )
    assert out[0] == spec["renderings"][conv]


def _family_tok(demo_tok, family: str):
    """The demo's byte-level BPE with the family's special tokens and official template installed."""
    tok = copy.deepcopy(demo_tok)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    variables = GOLDEN["families"][family]["template_variables"]
    tok.bos_token = variables.get("bos_token", tok.bos_token)
    tok.eos_token = variables["eos_token"]
    tok.chat_template = shipped(family)
    return tok


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_mask_covers_each_answer_and_its_end_of_turn_for_every_family(demo_tok, family):
    tok = _family_tok(demo_tok, family)
    messages = GOLDEN["conversations"]["c"]["messages"]
    enc = encode_chat(tok, messages, 4096)
    # The ids are the official rendering, byte for byte.
    assert tok.decode(enc["input_ids"]) == GOLDEN["families"][family]["renderings"]["c"]
    learned = tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE])
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert learned.replace(" ", "") == "".join(a + END[family] for a in answers).replace(" ", "")
    # Nothing of the prompt side carries loss: every labelled token lies inside an answer.
    assert "user" not in learned and "INST" not in learned and "system" not in learned
    assert end_of_turn(tok) == END[family]
    assert tok.convert_tokens_to_ids(END[family]) in stop_token_ids(tok)


def test_loss_mask_tracks_repeated_text_to_the_answer_not_the_question(demo_tok):
    # The answer's text also appears in the question: a search for the text would label the question.
    messages = [{"role": "user", "content": "Say: Paris."}, {"role": "assistant", "content": "Paris."}]
    enc = encode_chat(demo_tok, messages, 512)
    labelled = [i for i, lab in enumerate(enc["labels"]) if lab != IGNORE]
    assert demo_tok.decode([enc["input_ids"][i] for i in labelled]) == "Paris.<|im_end|>"
    assert labelled[0] > len(enc["input_ids"]) - 6  # at the end, not in the user turn


def test_a_named_template_that_renders_differently_from_the_models_own_is_refused(demo_tok):
    with pytest.raises(
        ForgeError, match=r"renders differently .*at character \d+.*model.chat_template = \"model\""
    ):
        resolve(demo_tok, "qwen2_5", "demo")


def test_the_models_own_template_is_kept_byte_for_byte(demo_path, demo_tok):
    own = (Path(demo_path) / "chat_template.jinja").read_text()
    assert load_tokenizer(demo_path, "model").chat_template == own == demo_tok.chat_template


def test_a_named_template_fills_in_where_the_model_ships_none_and_model_then_fails(demo_tok):
    tok = copy.deepcopy(demo_tok)
    tok.chat_template = None
    assert resolve(tok, "chatml", "bare") == shipped("chatml")
    with pytest.raises(ForgeError, match="ships no chat template"):
        resolve(tok, "model", "bare")


def test_a_template_that_rewrites_answers_is_refused(demo_tok):
    tok = copy.deepcopy(demo_tok)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper + '<|im_end|>' }}{% endfor %}"
    )
    with pytest.raises(ForgeError, match="changes the assistant's text"):
        encode_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], 64)


def test_old_template_names_still_load_and_unknown_ones_suggest():
    assert parse_config({"model": {"chat_template": "qwen2"}}).model.chat_template == "qwen2_5"
    assert parse_config({"model": {"chat_template": "llama3"}}).model.chat_template == "llama3_1"
    with pytest.raises(ForgeError, match="qwen2_5"):
        parse_config({"model": {"chat_template": "qwen25"}})
