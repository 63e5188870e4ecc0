"""The replica's HTTP API: probes, OpenAI-compatible inference, admin; ``create_app`` builds it."""

from metalserve.api.app import create_app
from metalserve.replica import read_token

__all__ = ["create_app", "read_token"]
