"""Validation of fine-tuning JSONL files, line by line (the file is never held in memory whole).

Accepted row formats (the ones mlx-lm's tuner datasets read), one format per file:
- chat:       {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}
              with at least one assistant message;
- completion: {"prompt": "...", "completion": "..."};
- text:       {"text": "..."}.
Blank lines are skipped. Line numbers are 1-based, as an editor shows them.

Everything training would trip over is refused here, at upload (a 400), never later in the worker:
bytes that are not UTF-8, a lone surrogate written as a JSON escape ("\\ud800", which no tokenizer
encodes), NaN or Infinity, nesting deeper than MAX_ROW_DEPTH, a line over MAX_LINE_BYTES."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator, Optional

MAX_REPORTED_ERRORS = 10
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_LINE_BYTES = 8 << 20  # one example; training cuts it to max_seq_length tokens anyway
MAX_ROW_DEPTH = 64


@dataclass(frozen=True)
class LineError:
    line: int
    message: str


@dataclass
class ValidationReport:
    rows: int = 0
    format: Optional[str] = None  # "chat" | "completion" | "text"
    errors: list[LineError] = field(default_factory=list)  # the first MAX_REPORTED_ERRORS
    total_errors: int = 0

    @property
    def ok(self) -> bool:
        return self.total_errors == 0 and self.rows > 0


def row_format(row: dict) -> Optional[str]:
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "completion"
    if "text" in row:
        return "text"
    return None


def _check_chat(row: dict) -> Optional[str]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list of {"role", "content"} objects'
    has_assistant = False
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] is not an object"
        role = m.get("role")
        if role not in CHAT_ROLES:
            return f"messages[{i}].role is {role!r}; accepted roles: {', '.join(CHAT_ROLES)}"
        content = m.get("content")
        if not isinstance(content, str) and not (role == "assistant" and m.get("tool_calls")):
            return f"messages[{i}].content must be a string"
        if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
            return f"messages[{i}].tool_calls must be a list"
        has_assistant |= role == "assistant"
    if not has_assistant:
        return "a chat example needs at least one assistant message to learn from"
    if row.get("tools") is not None and not isinstance(row["tools"], list):
        return '"tools" must be a list of function specs'
    return None


def _value_problem(row: object) -> Optional[str]:
    """A lone surrogate (in a string or a key) or nesting past MAX_ROW_DEPTH, anywhere in the row."""
    stack = [(row, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "a string holds a lone UTF-16 surrogate (such as \\ud800); text must be valid Unicode"
        elif isinstance(value, (dict, list)):
            if depth >= MAX_ROW_DEPTH:
                return f"the row is nested more than {MAX_ROW_DEPTH} levels deep"
            items = [x for kv in value.items() for x in kv] if isinstance(value, dict) else value
            stack.extend((x, depth + 1) for x in items)
    return None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _check_row(row: object) -> tuple[Optional[str], Optional[str]]:
    """-> (format, error message)."""
    if not isinstance(row, dict):
        return None, "each line must be a JSON object"
    fmt = row_format(row)
    if fmt is None:
        return None, 'unknown row format: expected "messages", "prompt"+"completion" or "text"'
    if fmt == "chat":
        return fmt, _check_chat(row)
    if fmt == "completion":
        if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
            return fmt, '"prompt" and "completion" must be strings'
        return fmt, None
    if not isinstance(row["text"], str) or not row["text"]:
        return fmt, '"text" must be a non-empty string'
    return fmt, None


def validate_jsonl_lines(lines: Iterable[Optional[bytes]]) -> ValidationReport:
    report = ValidationReport()

    def error(line: int, message: str) -> None:
        report.total_errors += 1
        if len(report.errors) < MAX_REPORTED_ERRORS:
            report.errors.append(LineError(line, message))

    for number, raw in enumerate(lines, start=1):
        if raw is None:
            error(number, f"the line is longer than {MAX_LINE_BYTES} bytes")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            error(number, f"not UTF-8 ({e.reason} at byte {e.start})")
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text, parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            error(number, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        except (ValueError, RecursionError) as e:  # NaN, a number of 5,000 digits, 100k nested arrays
            why = str(e).split(":")[0][:100] if isinstance(e, ValueError) else "nested too deeply"
            error(number, f"invalid JSON ({why})")
            continue
        fmt, problem = _check_row(row)
        problem = problem or _value_problem(row)
        if problem:
            error(number, problem)
            continue
        if report.format is None:
            report.format = fmt
        elif fmt != report.format:
            error(number, f"row is in {fmt} format but the file's first row is in {report.format} format")
            continue
        report.rows += 1
    if report.rows == 0 and report.total_errors == 0:
        error(1, "the file holds no examples")
    return report


def bounded_lines(f: BinaryIO, limit: Optional[int] = None) -> Iterator[Optional[bytes]]:
    """The lines of `f`, each read whole only up to `limit` bytes (MAX_LINE_BYTES); a longer one is
    skipped and stands as None (a file of one 512 MB line must not be held in memory to be refused)."""
    limit = MAX_LINE_BYTES if limit is None else limit
    while line := f.readline(limit + 1):
        if len(line) <= limit:
            yield line
            continue
        while line and not line.endswith(b"\n"):  # the rest of the long line
            line = f.readline(1 << 20)
        yield None


def validate_jsonl_file(path: str) -> ValidationReport:
    with open(path, "rb") as f:
        return validate_jsonl_lines(bounded_lines(f))


def read_rows(path: str) -> list[dict]:
    """The rows of a validated file (blank lines skipped)."""
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]
