"""Chat templates, one per model family.

The preset names a template and that one template drives the whole pipeline: training, sample
chats, chat, merge and export. Each template marks assistant turns with `{% generation %}` so
transformers can return the mask of tokens that carry loss; exported copies drop those markers
because some serving stacks do not know them.
"""

from __future__ import annotations

from dataclasses import dataclass

from assistant_forge.errors import ForgeError, did_you_mean


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    stop: str  # the text that ends an assistant turn; its token id stops generation

    def export_jinja(self) -> str:
        """The template without training markers, for saved tokenizers."""
        return self.jinja.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def _chatml(bos: str = "") -> str:
    return (
        bos + "{%- for message in messages %}"
        "{%- if message['role'] == 'assistant' %}"
        "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
        "{%- else %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


_LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Mistral has no system role: a system message is prepended to the first user turn.
_MISTRAL = (
    "{{- bos_token }}"
    "{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if system and loop.index0 <= 1 %}{{- '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{% generation %}{{- ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{%- endif %}"
    "{%- endfor %}"
)

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate("chatml", _chatml(), "<|im_end|>"),
        ChatTemplate("qwen2", _chatml(), "<|im_end|>"),
        ChatTemplate("yi", _chatml(), "<|im_end|>"),
        ChatTemplate("internlm2", _chatml("{{- bos_token }}"), "<|im_end|>"),
        ChatTemplate("llama3", _LLAMA3, "<|eot_id|>"),
        ChatTemplate("mistral", _MISTRAL, "</s>"),
    )
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ForgeError(
            f"Unknown chat template {name!r}.{did_you_mean(name, list(TEMPLATES))} Known: {', '.join(TEMPLATES)}."
        ) from None
