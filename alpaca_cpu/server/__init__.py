"""alpaca-server: an OpenAI-compatible HTTP server with continuous batching."""

from .app import ServerSettings, create_app
from .scheduler import Scheduler

__all__ = ["Scheduler", "ServerSettings", "create_app"]
