"""schemathesis against the server's own OpenAPI document: for every operation, a bounded number
of schema-conforming (positive) and schema-violating (negative) requests over real HTTP. No answer
may be a 5xx, none may hang past the client timeout, and the server still serves afterwards.

The app turns the /openapi.json route off (openapi_url=None), so the document is app.openapi():
the very one FastAPI would serve. Every operation in it is fuzzed; one that schemathesis cannot
load fails the test instead of being skipped.
"""
from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from .live import MODEL

EXAMPLES_PER_OPERATION = 6  # per mode; bounded so the suite stays fast on a 2-core box
# The generation routes have ~25 optional fields each: more examples, or a field is rarely set.
EXAMPLES_FOR = {"POST /v1/chat/completions": 60, "POST /v1/completions": 60}


def fuzz_operation(operation, mode, url: str, failures: list) -> int:
    sent = []

    @settings(max_examples=EXAMPLES_FOR.get(operation.label, EXAMPLES_PER_OPERATION), deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=(Phase.generate,))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            # A random model name stops every request at the 404 before the interesting fields
            # are read; name the served model so positive cases reach sampling, templates, jobs.
            case.body["model"] = MODEL
        try:
            response = case.call(base_url=url, timeout=60)
        except Exception as e:  # a reset, a hang past the timeout: as bad as a 5xx
            failures.append(f"{operation.label} [{mode.value}] {type(e).__name__}: {e}")
            return
        sent.append(response.status_code)
        if response.status_code >= 500:
            failures.append(f"{operation.label} [{mode.value}] {response.status_code}: {response.text[:300]} "
                            f"<- {case.as_curl_command()[:400]}")

    try:
        run()
    except Unsatisfiable:
        # Negative mode on an operation with no parameters or body: nothing to violate. Positive
        # mode must always produce requests (checked by the caller).
        if mode is GenerationMode.POSITIVE:
            raise
    return len(sent)


def test_fuzz_every_operation(full_server):
    schema = schemathesis.openapi.from_dict(full_server.app.openapi())
    operations, failures, counts = [], [], {}
    for result in schema.get_all_operations():
        operations.append(result.ok())  # raises for an operation schemathesis cannot build: not skipped
    assert len(operations) >= 20, [op.label for op in operations]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            counts[(operation.label, mode.value)] = fuzz_operation(operation, mode, full_server.url, failures)
    assert not failures, "\n".join(failures)
    # every operation answered at least one generated request in positive mode
    silent = [label for (label, mode), n in counts.items() if mode == "positive" and n == 0]
    assert not silent, silent
    print(f"fuzzed {len(operations)} operations, {sum(counts.values())} requests")
    # and the server is alive and serving
    with httpx.Client(base_url=full_server.url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert c.get("/health").json()["engine"]["num_running"] == 0
