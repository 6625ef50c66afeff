from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fireside.api import CompletionService, create_app
from tests.fakes import service_settings

from .fake_engine import FakeEngine
from .helpers import MODEL


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


MakeClient = Callable[..., TestClient]


@pytest.fixture
def make_client(engine: FakeEngine) -> MakeClient:
    def make(
        engines: dict[str, Any] | None = None,
        api_keys: Sequence[str] = (),
        default_max_tokens: int | None = None,
        service_kwargs: dict[str, Any] | None = None,
        **app_kwargs: Any,
    ) -> TestClient:
        settings = service_settings(**(service_kwargs or {}))
        if default_max_tokens is not None:
            settings["default_max_tokens"] = default_max_tokens
        service = CompletionService(engines or {MODEL: engine}, **settings)
        app = create_app(service, api_keys=api_keys, **app_kwargs)
        # raise_server_exceptions=False: a 500 must be an answer, not a crash.
        return TestClient(app, raise_server_exceptions=False)

    return make


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    return make_client()
