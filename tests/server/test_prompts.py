"""What the chat template is given: the messages' tool history, and the tools unless tool_choice is 'none'."""
from __future__ import annotations

import copy

from parallm.server.prompts import chat_prompt
from parallm.server.api_models import ChatCompletionRequest

# renders exactly what reaches it, so the assertions see the template's inputs (a newline after a
# block tag is trimmed by transformers' Jinja settings, hence the explicit one)
TEMPLATE = ("{% for t in tools or [] %}TOOL {{ t.function.name }}: {{ t.function.description }}\n{% endfor %}"
            "{% for m in messages %}{{ m.role }}: {{ m.content }}"
            "{% for c in m.tool_calls or [] %} CALL {{ c.function.name }}({{ c.function.arguments }}){% endfor %}"
            "{% if m.tool_call_id %} FOR {{ m.tool_call_id }}{% endif %}{{ '\\n' }}{% endfor %}")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": {"type": "object"}}}]
MESSAGES = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
]


def _text(hf_tokenizer, **fields) -> str:
    tok = copy.deepcopy(hf_tokenizer)
    tok.chat_template = TEMPLATE
    request = ChatCompletionRequest(model="m", messages=MESSAGES, add_generation_prompt=False, **fields)
    return chat_prompt(tok, request, "m").text


def test_tools_and_the_tool_history_reach_the_template(hf_tokenizer):
    text = _text(hf_tokenizer, tools=TOOLS, tool_choice="auto")
    assert text.splitlines() == [
        "TOOL get_weather: the weather in a city",
        "user: Weather in Paris?",
        'assistant:  CALL get_weather({"city": "Paris"})',
        "tool: sunny FOR c1",
    ]


def test_tool_choice_none_keeps_the_tools_out(hf_tokenizer):
    text = _text(hf_tokenizer, tools=TOOLS, tool_choice="none")
    assert "TOOL" not in text and "CALL get_weather" in text  # the history still renders
    assert _text(hf_tokenizer).splitlines()[0] == "user: Weather in Paris?"
