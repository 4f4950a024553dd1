"""Chat templates rendered by transformers, for afinar's `hub::chat_template` tests.

    .venv/bin/python scripts/reference/golden_chat.py   # writes tests/fixtures/chat/golden.json

Renders each conversation with transformers' own `render_jinja_template` (the code
behind `tokenizer.apply_chat_template(..., tokenize=False)`): SmolLM2-135M-Instruct's
ChatML template verbatim, and a multi-line template of our own that leans on what
real templates use (trim_blocks/lstrip_blocks, `.strip()`, `.startswith()`,
`namespace`, `loop.last`, `raise_exception`, `tojson`).
"""

import json
import pathlib

import transformers
from transformers.utils.chat_template_utils import render_jinja_template

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Whitespace-sensitive on purpose: block tags on their own lines are eaten by
# trim_blocks + lstrip_blocks, which is how transformers compiles templates.
PYCOMPAT = """{{ bos_token }}
{% set ns = namespace(system='') %}
{% if messages[0]['role'] == 'system' %}
    {% set ns.system = messages[0]['content'].strip() %}
    {% set loop_messages = messages[1:] %}
{% else %}
    {% set loop_messages = messages %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
[INST] {% if loop.first and ns.system %}<<SYS>>{{ ns.system }}<</SYS>> {% endif %}{{ message['content'].strip() }} [/INST]
    {%- if message['content'].startswith('JSON') %} {{ message | tojson }}{% endif %}
    {% else %}
 {{ message['content'].strip() + eos_token }}{% if not loop.last %}

{% endif %}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
 {% endif %}"""

TEMPLATES = {
    "smollm2": {"source": SMOLLM2, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
    "pycompat": {"source": PYCOMPAT, "bos_token": "<s>", "eos_token": "</s>"},
}

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "What is 2 + 2?"}],
    "system_user_assistant": [
        {"role": "system", "content": "  Answer with a number only.\n"},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Translate 'chat' to English."},
        {"role": "assistant", "content": " cat \n"},
        {"role": "user", "content": "JSON please: and 'chien'?"},
        {"role": "assistant", "content": "dog"},
    ],
    "unicode_newlines": [
        {"role": "system", "content": "Réponds en français. 日本語も OK."},
        {"role": "user", "content": "Line one\nLine two\n\n\"quoted\" <tag> & done"},
        {"role": "assistant", "content": "D'accord — ✓"},
    ],
    "not_alternating": [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
    ],
}


def main():
    cases = []
    for tname, t in TEMPLATES.items():
        for cname, chat in CONVERSATIONS.items():
            for gen in (False, True):
                case = {
                    "name": f"{tname}/{cname}/gen={gen}",
                    "template": tname,
                    "messages": chat,
                    "add_generation_prompt": gen,
                }
                try:
                    rendered, _ = render_jinja_template(
                        conversations=[chat],
                        chat_template=t["source"],
                        add_generation_prompt=gen,
                        bos_token=t["bos_token"],
                        eos_token=t["eos_token"],
                    )
                    case["rendered"] = rendered[0]
                except Exception as e:  # raise_exception in the template
                    case["error"] = str(e)
                cases.append(case)
    out = pathlib.Path(__file__).resolve().parents[2] / "tests/fixtures/chat/golden.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"transformers": transformers.__version__, "templates": TEMPLATES, "cases": cases}
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out}: {len(cases)} cases")


if __name__ == "__main__":
    main()
