"""Checks on a parsed JSON body that no field type expresses: each request model (and route taking
a free-form body) runs them first, so that a bad value anywhere, free-form fields included (tool
schemas, chat_template_kwargs, fine-tuning methods), is a 400 naming where it is."""
from __future__ import annotations

import math
from typing import Any, Optional

from parallm.server.error_responses import printable

MAX_JSON_DEPTH = 64  # nesting of a request body, free-form fields (tool schemas, template kwargs) included
MAX_JSON_VALUES = 100_000  # strings, numbers, objects... in a body (but `prompt`): 2048 messages need ~10k


def json_value_problem(value: Any, max_depth: int = MAX_JSON_DEPTH) -> Optional[str]:
    """Why a parsed JSON body cannot be served, naming where (e.g. "messages[0].content holds ..."), or None."""
    found = find_json_problem(value, max_depth)
    return None if found is None else f"{found[0] or 'the body'} {found[1]}"


def find_json_problem(value: Any, max_depth: int = MAX_JSON_DEPTH) -> Optional[tuple[str, str]]:
    """(where, what is wrong) for the first value of a parsed JSON body that cannot be served, or None:
    a lone UTF-16 surrogate in a string or key (JSON may spell one, "\\ud800", Python's parser keeps
    it, no UTF-8 encoder, so no tokenizer, takes it); NaN or Infinity (Python's json reads them, no
    JSON writer may write them); nesting past max_depth; over MAX_JSON_VALUES values (this walk, then
    pydantic, held the event loop for seconds over 8 MB of them). Iterative: no recursion limit."""
    stack, seen = [("", value, 0)], 0
    while stack:
        path, v, depth = stack.pop()
        problem = None
        if isinstance(v, (dict, list)):
            seen += len(v)  # counted before they are looked at, so a huge object is refused at once
            if seen > MAX_JSON_VALUES:
                return "", f"holds more than {MAX_JSON_VALUES} JSON values"
        if isinstance(v, str):
            if not v.isascii() and v != printable(v):
                problem = "holds a lone UTF-16 surrogate (such as \\ud800); text must be valid Unicode"
        elif isinstance(v, float):
            if not math.isfinite(v):
                problem = f"is {v}; numbers must be finite (NaN and Infinity are not JSON)"
        elif depth >= max_depth and isinstance(v, (dict, list)):
            problem = f"is nested more than {max_depth} levels deep"
        elif isinstance(v, dict):
            for k, x in v.items():
                at = f"{path}.{k}" if path else str(k)
                stack.append((at, k, depth + 1))  # keys reach templates too
                stack.append((at, x, depth + 1))
        elif isinstance(v, list) and not set(map(type, v)) <= {int, bool}:  # token ids need no look
            stack.extend((f"{path}[{i}]", x, depth + 1) for i, x in enumerate(v))
        if problem is not None:
            return printable(path), problem
    return None
