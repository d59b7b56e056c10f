"""Hand-written hostile input: every case gets a 4xx with an OpenAI-shaped error body on a
connection the server keeps open (uvicorn closes it only after an unhandled error, a 500), and the
server stays up. Field-type cases are generated from the pydantic request models, so a new field
is covered without editing this file. Job cases name the training file as TRAINING_FILE: a real
one, uploaded by the `training_file` fixture, so they reach the checks past the file lookup."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx
import pytest

from parallm.server.api_models import ChatCompletionRequest, CompletionRequest

from .conftest import SHORT_CONTEXT
from .live import MODEL, assert_openai_error

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
VOCAB = 49152
TRAINING_FILE = "@training-file@"  # replaced by a real uploaded file's id when sent
GOOD_ROWS = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n' * 4


@dataclass
class Case:
    name: str
    path: str
    method: str = "POST"
    json: Any = None  # sent as JSON when `raw` is None
    raw: Optional[bytes] = None  # sent byte for byte
    status: Optional[int] = None  # None: any 4xx
    code: Optional[str] = None  # the expected error.code, when it is part of the contract
    headers: dict = field(default_factory=dict)
    upload: Optional[bytes] = None  # sent as a multipart /v1/files upload (purpose fine-tune)


def chat(**fields) -> dict:
    return {**CHAT, **fields}


def completion(**fields) -> dict:
    return {**COMPLETION, **fields}


def nested(depth: int) -> bytes:
    return b'{"model": "tiny", "messages": ' + b"[" * depth + b"]" * depth + b"}"


def raw_json(body: dict, **raw_fields: str) -> bytes:
    """`body` as JSON with each of `raw_fields` spliced in as written (NaN, escapes, deep nesting)."""
    text = json.dumps(body)[:-1]
    return (text + "".join(f', "{k}": {v}' for k, v in raw_fields.items()) + "}").encode()


def job(**fields) -> dict:
    return {"model": MODEL, "training_file": TRAINING_FILE, **fields}


DEEP = "[" * 100_000 + "]" * 100_000


CASES = [
    # malformed, empty and deeply nested bodies
    Case("malformed json", "/v1/chat/completions", raw=b'{"model": "tiny", "messages": [', status=400),
    Case("trailing garbage", "/v1/completions", raw=b'{"model": "tiny", "prompt": "x"} extra', status=400),
    Case("empty body", "/v1/chat/completions", raw=b"", status=400),
    Case("empty object", "/v1/chat/completions", json={}, status=400),
    Case("json null", "/v1/completions", raw=b"null", status=400),
    Case("json array", "/v1/completions", raw=b"[1, 2, 3]", status=400),
    Case("json string", "/v1/completions", raw=b'"prompt"', status=400),
    Case("not utf-8", "/v1/completions", raw=b'{"model": "tiny", "prompt": "\xff\xfe"}', status=400),
    Case("nested 100k deep", "/v1/chat/completions", raw=nested(100_000), status=400),
    Case("nested 1k deep", "/v1/chat/completions", raw=nested(1_000), status=400),
    Case("nested content parts", "/v1/chat/completions",
         json=chat(messages=[{"role": "user", "content": [{"type": "text", "text": {"a": [[[[]]]]}}]}]), status=400),
    # out-of-range numbers
    Case("max_tokens 0", "/v1/chat/completions", json=chat(max_tokens=0), status=400),
    Case("max_tokens 1e12", "/v1/chat/completions", json=chat(max_tokens=10**12), status=400),
    Case("max_tokens 1e12 completion", "/v1/completions", json=completion(max_tokens=10**12), status=400),
    Case("max_tokens 2^70", "/v1/completions", json=completion(max_tokens=2**70), status=400),
    Case("max_tokens negative", "/v1/completions", json=completion(max_tokens=-5), status=400),
    Case("n 0", "/v1/chat/completions", json=chat(n=0), status=400),
    Case("n 1e5", "/v1/chat/completions", json=chat(n=10**5), status=400),
    Case("n 1e5 completion", "/v1/completions", json=completion(n=10**5), status=400),
    Case("temperature -1", "/v1/chat/completions", json=chat(temperature=-1), status=400),
    Case("temperature nan", "/v1/chat/completions", raw=json.dumps(chat(temperature=float("nan"))).encode(),
         status=400),
    Case("temperature inf", "/v1/completions", raw=json.dumps(completion(temperature=float("inf"))).encode(),
         status=400),
    Case("top_p 2", "/v1/chat/completions", json=chat(top_p=2), status=400),
    Case("top_p 0", "/v1/completions", json=completion(top_p=0), status=400),
    Case("top_logprobs 1000", "/v1/chat/completions", json=chat(logprobs=True, top_logprobs=1000), status=400),
    Case("logprobs 1000", "/v1/completions", json=completion(logprobs=1000), status=400),
    Case("seed 2^80", "/v1/completions", json=completion(seed=2**80), status=400),
    Case("presence_penalty 1e9", "/v1/completions", json=completion(presence_penalty=1e9), status=400),
    Case("logit_bias 1e9", "/v1/completions", json=completion(logit_bias={"5": 1e9}), status=400),
    Case("best_of 1e5", "/v1/completions", json=completion(best_of=10**5), status=400),
    # token ids, context, stop strings
    Case("token id past vocab", "/v1/completions", json=completion(prompt=[VOCAB]), status=400),
    Case("token id 1e12", "/v1/completions", json=completion(prompt=[10**12]), status=400),
    Case("negative token id", "/v1/completions", json=completion(prompt=[-1]), status=400),
    Case("token id in 2nd prompt", "/v1/completions", json=completion(prompt=[[1, 2], [3, VOCAB + 7]]), status=400),
    Case("empty token list", "/v1/completions", json=completion(prompt=[]), status=400),
    Case("stop_token_ids past vocab", "/v1/completions", json=completion(stop_token_ids=[VOCAB * 3]), status=400),
    Case("chat stop_token_ids past vocab", "/v1/chat/completions", json=chat(stop_token_ids=[VOCAB]), status=400),
    # what parallm cannot honour is refused, not ignored
    Case("tool_choice required", "/v1/chat/completions", status=400,
         json=chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required")),
    Case("tool without a name", "/v1/chat/completions", status=400,
         json=chat(tools=[{"type": "function", "function": {"name": ""}}])),
    Case("response_format json_schema", "/v1/chat/completions", status=400,
         json=chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}})),
    Case("more prompts than ever admitted", "/v1/completions", json=completion(prompt=["hi"] * 100_000),
         status=400),
    Case("logit_bias key past vocab", "/v1/completions", json=completion(logit_bias={str(VOCAB * 2): 1}),
         status=400),
    Case("logit_bias key not a number", "/v1/completions", json=completion(logit_bias={"abc": 1}), status=400),
    Case("prompt ids longer than context", "/v1/completions",
         json=completion(prompt=[5] * (SHORT_CONTEXT + 10)), status=400, code="context_length_exceeded"),
    Case("prompt text longer than context", "/v1/chat/completions",
         json=chat(messages=[{"role": "user", "content": "word " * (SHORT_CONTEXT * 2)}]), status=400,
         code="context_length_exceeded"),
    Case("prompt + max_tokens past context", "/v1/completions",
         json=completion(prompt=[5] * (SHORT_CONTEXT - 4), max_tokens=10), status=400,
         code="context_length_exceeded"),
    Case("1000 stop strings", "/v1/chat/completions", json=chat(stop=[f"s{i}" for i in range(1000)]), status=400),
    Case("empty stop string", "/v1/completions", json=completion(stop=[""]), status=400),
    # lone surrogates (raw JSON escapes: a Python str would refuse to encode them)
    Case("lone surrogate in content", "/v1/chat/completions",
         raw=b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}',
         status=400),
    Case("lone low surrogate in prompt", "/v1/completions",
         raw=b'{"model": "tiny", "prompt": "\\udc00", "max_tokens": 2}', status=400),
    Case("lone surrogate in stop", "/v1/completions",
         raw=b'{"model": "tiny", "prompt": "x", "stop": ["\\ud83d"], "max_tokens": 2}', status=400),
    Case("lone surrogate in model", "/v1/completions",
         raw=b'{"model": "\\ud800", "prompt": "x", "max_tokens": 2}', status=400),
    # unknown model, bad roles and parts
    Case("unknown model", "/v1/chat/completions", json=chat(model="nope"), status=404, code="model_not_found"),
    Case("empty model", "/v1/chat/completions", json=chat(model=""), status=400),
    Case("unknown role", "/v1/chat/completions", json=chat(messages=[{"role": "wizard", "content": "x"}]),
         status=400),
    Case("image part", "/v1/chat/completions",
         json=chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
         status=400),
    Case("no messages", "/v1/chat/completions", json=chat(messages=[]), status=400),
    # wrong methods and unknown paths
    Case("GET chat", "/v1/chat/completions", method="GET", status=405),
    Case("PUT completions", "/v1/completions", method="PUT", json=COMPLETION, status=405),
    Case("DELETE models", "/v1/models", method="DELETE", status=405),
    Case("POST health", "/health", method="POST", status=405),
    Case("PATCH files", "/v1/files", method="PATCH", status=405),
    Case("unknown /v1 path", "/v1/nope", method="GET", status=404),
    Case("unknown root path", "/nope", method="POST", json={}, status=404),
    Case("path under a route", "/v1/chat/completions/extra", status=404),
    Case("docs are off", "/docs", method="GET", status=404),
    # the other routers' bodies
    Case("adapter load: malformed json", "/v1/load_lora_adapter", raw=b"{", status=400),
    Case("adapter load: array body", "/v1/load_lora_adapter", raw=b"[]", status=400),
    Case("adapter load: wrong types", "/v1/load_lora_adapter", json={"lora_name": 5, "lora_path": []}, status=400),
    Case("adapter load: lone surrogate", "/v1/load_lora_adapter",
         raw=b'{"lora_name": "\\ud800", "lora_path": "\\ud800"}', status=400),
    Case("adapter load: a 5,000-digit number", "/v1/load_lora_adapter",
         raw=b'{"lora_name": "a", "lora_path": "b", "x": ' + b"9" * 5000 + b"}", status=400),
    Case("adapter unload: a 5,000-digit number", "/v1/unload_lora_adapter",
         raw=b'{"lora_name": ' + b"9" * 5000 + b"}", status=400),
    Case("adapter unload: unknown", "/v1/unload_lora_adapter", json={"lora_name": "nope"}, status=404),
    Case("job create: malformed json", "/v1/fine_tuning/jobs", raw=b"{", status=400),
    Case("job create: wrong types", "/v1/fine_tuning/jobs", json={"model": 5, "training_file": ["x"]}, status=400),
    Case("job create: unknown file", "/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": "file-nope"},
         status=404),
    Case("job create: nested hyperparameters", "/v1/fine_tuning/jobs",
         json={"model": MODEL, "training_file": "file-x", "hyperparameters": {"n_epochs": {"a": [1]}}}),
    Case("jobs list: limit -1", "/v1/fine_tuning/jobs?limit=-1", method="GET", status=400),
    Case("jobs list: limit huge", "/v1/fine_tuning/jobs?limit=100000000000000000000", method="GET", status=400),
    Case("files: upload not multipart", "/v1/files", json={"file": "x", "purpose": "fine-tune"}, status=400),
    Case("files: no purpose", "/v1/files", raw=b"", status=400),
    # --- found by probing every route (docs/reliability.md, "Every input checked ...") ---
    # lone surrogates in keys, and in the admin and fine-tuning string fields
    Case("lone surrogate in a key", "/v1/chat/completions", raw=raw_json(CHAT, **{"\\ud800": "1"}), status=400),
    Case("lone surrogate in a nested key", "/v1/completions",
         raw=raw_json(COMPLETION, metadata='{"\\udc00": 1}'), status=400),
    Case("adapter load: lone surrogate in lora_path", "/v1/load_lora_adapter",
         raw=b'{"lora_name": "a", "lora_path": "x\\ud800"}', status=400),
    Case("adapter unload: lone surrogate", "/v1/unload_lora_adapter", raw=b'{"lora_name": "\\ud800"}', status=400),
    Case("job create: lone surrogate in model", "/v1/fine_tuning/jobs",
         raw=raw_json({"training_file": TRAINING_FILE}, model='"\\ud800"'), status=400),
    Case("job create: lone surrogate in training_file", "/v1/fine_tuning/jobs",
         raw=raw_json({"model": MODEL}, training_file='"file-\\ud800"'), status=400),
    Case("job create: lone surrogate in a key", "/v1/fine_tuning/jobs",
         raw=raw_json(job(), metadata='{"\\ud800": "x"}'), status=400),
    # NaN and Infinity, which Python's json reads, anywhere
    Case("NaN in a tool schema", "/v1/chat/completions", status=400,
         raw=raw_json(CHAT, tools='[{"type": "function", "function": {"name": "f", "parameters": {"x": NaN}}}]')),
    Case("Infinity in chat_template_kwargs", "/v1/chat/completions",
         raw=raw_json(CHAT, chat_template_kwargs='{"x": Infinity}'), status=400),
    Case("job create: learning_rate_multiplier NaN", "/v1/fine_tuning/jobs",
         raw=raw_json(job(), hyperparameters='{"learning_rate_multiplier": NaN}'), status=400),
    Case("job create: learning_rate_multiplier Infinity", "/v1/fine_tuning/jobs",
         raw=raw_json(job(), hyperparameters='{"learning_rate_multiplier": Infinity}'), status=400),
    Case("legacy fine-tunes: learning_rate_multiplier NaN", "/v1/fine-tunes",
         raw=raw_json(job(), learning_rate_multiplier="NaN"), status=400),
    Case("job create: lora scale NaN", "/v1/fine_tuning/jobs",
         raw=raw_json(job(), method='{"type": "lora", "lora": {"scale": NaN}}'), status=400),
    # deep and wide bodies
    Case("adapter load: nested 100k deep", "/v1/load_lora_adapter", raw=DEEP.encode(), status=400),
    Case("adapter load: lora_path nested 100k deep", "/v1/load_lora_adapter",
         raw=raw_json({"lora_name": "a"}, lora_path=DEEP), status=400),
    Case("adapter unload: nested 100k deep", "/v1/unload_lora_adapter", raw=DEEP.encode(), status=400),
    Case("tool schema nested 100 deep", "/v1/chat/completions", status=400,
         json=chat(tools=[{"type": "function", "function": {"name": "f", "parameters": json.loads(
             '{"a": ' * 100 + "1" + "}" * 100)}}])),
    Case("200k values in chat_template_kwargs", "/v1/chat/completions", status=400,
         json=chat(chat_template_kwargs={f"k{i}": i for i in range(200_000)})),
    Case("job create: method nested 100 deep", "/v1/fine_tuning/jobs", status=400,
         json=job(method=json.loads('{"a": ' * 100 + "1" + "}" * 100))),
    # too long, too many, too big
    Case("adapter load: 5,000-character lora_path", "/v1/load_lora_adapter",
         json={"lora_name": "a", "lora_path": "a" * 5000}, status=400),
    Case("adapter load: lora_path of 3,000 segments", "/v1/load_lora_adapter",
         json={"lora_name": "a", "lora_path": "a/" * 3000}, status=400),
    Case("stop string of 1,001 characters", "/v1/completions", json=completion(stop=["a" * 1001]), status=400),
    Case("129 tools", "/v1/chat/completions", status=400,
         json=chat(tools=[{"type": "function", "function": {"name": "f"}}] * 129)),
    Case("1,025 logit_bias entries", "/v1/completions", json=completion(logit_bias={str(i): 1 for i in range(1025)}),
         status=400),
    Case("top_k 2^40", "/v1/chat/completions", json=chat(top_k=2**40), status=400),
    # client chat templates, off by default (test_templates.py has the sandbox)
    Case("chat_template_kwargs.chat_template", "/v1/chat/completions", status=400, code="chat_template_not_allowed",
         json=chat(chat_template_kwargs={"chat_template": "{{ messages[0].content }}"})),
    Case("top-level chat_template", "/v1/chat/completions", json=chat(chat_template="{{ 'x' }}"), status=400,
         code="chat_template_not_allowed"),
    # fine-tuning values
    Case("job create: seed 2^70", "/v1/fine_tuning/jobs", json=job(seed=2**70), status=400),
    Case("job create: seed 2^63", "/v1/fine_tuning/jobs", json=job(seed=2**63), status=400),
    Case("job create: seed -1", "/v1/fine_tuning/jobs", json=job(seed=-1), status=400),
    Case("job create: learning_rate_multiplier 2^1100", "/v1/fine_tuning/jobs",
         json=job(hyperparameters={"learning_rate_multiplier": 2**1100}), status=400),
    Case("job create: n_epochs 10^12", "/v1/fine_tuning/jobs", json=job(hyperparameters={"n_epochs": 10**12}),
         status=400),
    Case("job create: n_epochs 51", "/v1/fine_tuning/jobs", json=job(hyperparameters={"n_epochs": 51}), status=400),
    Case("job create: method.supervised a string", "/v1/fine_tuning/jobs",
         json=job(method={"type": "supervised", "supervised": "x"}), status=400),
    Case("job create: method.supervised.hyperparameters a string", "/v1/fine_tuning/jobs",
         json=job(method={"type": "supervised", "supervised": {"hyperparameters": "x"}}), status=400),
    Case("job create: method.supervised.hyperparameters a list", "/v1/fine_tuning/jobs",
         json=job(method={"type": "supervised", "supervised": {"hyperparameters": [1]}}), status=400),
    Case("job create: method.lora a string", "/v1/fine_tuning/jobs", json=job(method={"type": "lora", "lora": "x"}),
         status=400),
    Case("job create: method.lora.hyperparameters a string", "/v1/fine_tuning/jobs",
         json=job(method={"type": "lora", "lora": {"hyperparameters": "x"}}), status=400),
    Case("job create: method.lora.scale a string", "/v1/fine_tuning/jobs",
         json=job(method={"type": "lora", "lora": {"scale": "x"}}), status=400),
    # training files, checked whole at upload
    Case("files: a 5,000-digit number in a row", "/v1/files", status=400,
         upload=b'{"text": "x", "n": 1' + b"0" * 5000 + b"}\n"),
    Case("files: a row nested 10k deep", "/v1/files", upload=b'{"text": ' + b"[" * 10_000 + b"]" * 10_000 + b"}\n",
         status=400),
    Case("files: a row nested 100 deep", "/v1/files", status=400,
         upload=b'{"text": "x", "extra": ' + b"[" * 100 + b"]" * 100 + b"}\n"),
    Case("files: a lone surrogate escape in a row", "/v1/files", upload=b'{"text": "a\\ud800b"}\n', status=400),
    Case("files: NaN in a row", "/v1/files", upload=b'{"text": "x", "weight": NaN}\n', status=400),
]


def field_type_cases() -> list[Case]:
    """For every field of the two generation requests, a value of a type it never accepts."""
    cases = []
    for model_cls, path, base in ((ChatCompletionRequest, "/v1/chat/completions", CHAT),
                                  (CompletionRequest, "/v1/completions", COMPLETION)):
        for name, info in model_cls.model_fields.items():
            wrong: Any = {"wrong": ["type"]}
            annotation = str(info.annotation)
            if "dict" in annotation or "Options" in annotation:
                wrong = [1, [2]]  # fields that take an object get a list of mixed things
            route = "chat" if model_cls is ChatCompletionRequest else "completion"
            cases.append(Case(f"{route}.{name} wrong type", path, json={**base, name: wrong},
                              status=400))
    return cases


ALL_CASES = CASES + field_type_cases()


def send(client: httpx.Client, case: Case, training_file: str = TRAINING_FILE) -> httpx.Response:
    headers = dict(case.headers)
    if case.upload is not None:
        return client.post(case.path, files={"file": ("train.jsonl", case.upload)}, data={"purpose": "fine-tune"})
    if case.raw is not None:
        headers.setdefault("content-type", "application/json")
        raw = case.raw.replace(TRAINING_FILE.encode(), training_file.encode())
        return client.request(case.method, case.path, content=raw, headers=headers)
    if case.json is not None:
        body = json.loads(json.dumps(case.json).replace(TRAINING_FILE, training_file))
        return client.request(case.method, case.path, json=body, headers=headers)
    return client.request(case.method, case.path, headers=headers)


@pytest.fixture(scope="module")
def client(full_server):
    with httpx.Client(base_url=full_server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def training_file(client) -> str:
    r = client.post("/v1/files", files={"file": ("train.jsonl", GOOD_ROWS)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def local_port(response: httpx.Response) -> int:
    """The client's end of the connection a response came on."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.name for c in ALL_CASES])
def test_bad_input_gets_an_openai_error(client, training_file, case):
    response = send(client, case, training_file)
    error = assert_openai_error(response, case.status)
    if case.code is not None:
        assert error["code"] == case.code, error
    # the same connection serves the next request: nothing in the server failed unhandled
    assert response.headers.get("connection") != "close", response.headers
    after = client.get("/v1/models")
    assert after.status_code == 200 and local_port(after) == local_port(response)


def test_field_type_cases_cover_every_field():
    names = {c.name for c in field_type_cases()}
    assert len(names) == len(ChatCompletionRequest.model_fields) + len(CompletionRequest.model_fields)
    assert "chat.messages wrong type" in names and "completion.prompt wrong type" in names


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_oversized_body_is_413(full_server, client, chunked):
    limit = full_server.app.state.settings.max_body_bytes
    body = b'{"model": "tiny", "prompt": "' + b"a" * (limit + 1024) + b'"}'
    content = (body[i:i + 65536] for i in range(0, len(body), 65536)) if chunked else body
    r = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    error = assert_openai_error(r, 413)
    assert error["code"] == "request_too_large"


def test_server_still_serves_after_the_bad_input(client):
    r = client.post("/v1/completions", json=completion(max_tokens=3, ignore_eos=True))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    assert client.get("/health").json()["engine"]["num_running"] == 0


class EncodeRecorder:
    """A tokenizer that notes how many characters each encode call was given."""

    def __init__(self, inner):
        self._inner = inner
        self.encoded: list[int] = []

    def encode(self, text, *args, **kwargs):
        self.encoded.append(len(text))
        return self._inner.encode(text, *args, **kwargs)

    def __len__(self):
        return len(self._inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_a_prompt_that_could_never_fit_is_refused_untokenized(full_server, client, monkeypatch):
    """1 MB of text against a 96-token context: refused from its length alone (a 7.5 MB prompt took
    the tokenizer 3.8 s and 285 MB only to be refused), on both routes."""
    engine = full_server.app.state.serving.engine
    recorder = EncodeRecorder(engine.tokenizer(MODEL))
    monkeypatch.setattr(engine, "tokenizer", lambda model: recorder)
    text = "word " * 200_000
    for path, body in (("/v1/completions", completion(prompt=text)),
                       ("/v1/completions", completion(prompt=["hi", text])),
                       ("/v1/chat/completions", chat(messages=[{"role": "user", "content": text}]))):
        error = assert_openai_error(client.post(path, json=body), 400)
        assert error["code"] == "context_length_exceeded" and "could never fit" in error["message"], error
    assert max(recorder.encoded, default=0) < 1000, recorder.encoded  # "hi" and nothing long
    assert client.post("/v1/completions", json=completion(prompt="hi")).status_code == 200
