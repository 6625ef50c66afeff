"""HTTP layer: the completions API on top of `fireside.engine.client.EngineClient`."""

from fireside.api.app import create_app
from fireside.api.errors import APIError
from fireside.api.protocol import CompletionRequest
from fireside.api.responses import ModelInfo
from fireside.api.serving import CompletionService

__all__ = ["APIError", "CompletionRequest", "CompletionService", "ModelInfo", "create_app"]
