"""The HTTP side's OpenAPI schema tells the truth: schemathesis fuzzes every route from it against a
real daemon (no 5xx, only declared statuses, content types and bodies), and the schema declares
what the server really answers (400/401/404 with the error body, never FastAPI's 422; /metrics
as Prometheus text)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings

from adamd.client import Client

from ..conftest import running_daemon

TOKEN = "fuzz-token"


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Any]:
    """A daemon of its own (the fuzzer deletes and edits whatever it can reach), with a token so
    the 401s are exercised, and one model so paths can hit something."""
    with running_daemon(token=TOKEN) as d:
        with Client(d.grpc_address, token=TOKEN) as c:
            c.create_model("m", {"w": torch.zeros(3)}, lr=0.01)
            c.push_grad("m", {"w": torch.ones(3)})
        yield d


def test_every_route_answers_as_its_schema_says(fuzzed: Any) -> None:
    """Each operation of the schema, fuzzed (schemathesis' generators and default checks: no 5xx,
    declared status codes, content types, headers and response bodies). The operations are driven
    directly: schemathesis' pytest plugin does not run under this pytest."""
    api = schemathesis.openapi.from_url(f"{fuzzed.http_url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=20,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        def fuzz(case: Any) -> None:
            case.call_and_validate(timeout=10)

        fuzz()


def test_schema_declares_real_statuses_and_media_types(fuzzed: Any) -> None:
    spec = httpx.get(f"{fuzzed.http_url}/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            assert "422" not in op["responses"], (method, path)
            if "{model}" in path:
                assert "404" in op["responses"], (method, path)
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "ErrorBody" in spec["components"]["schemas"]
    r = httpx.get(f"{fuzzed.http_url}/metrics")
    assert r.headers["content-type"].startswith("text/plain")


def test_per_parameter_statistics_need_the_token(fuzzed: Any) -> None:
    """A one-element parameter's norm is |w|: with a token, /params is not open."""
    url = f"{fuzzed.http_url}/v1/models/m"
    assert httpx.get(f"{url}/params").status_code == 401
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{url}/params", headers=auth).status_code == 200
    assert httpx.get(url).status_code == 200  # the summary and history stay open
    assert httpx.get(f"{url}/history").status_code == 200
