"""The OpenAI-compatible server: `create_app(llm)` (FastAPI, the `[server]` extra) over a
continuous-batching `Scheduler`. Run it with `tritlm serve`; see docs/SERVER.md."""

from .scheduler import Event, Job, Scheduler, ServerError

__all__ = ["create_app", "Event", "Job", "Scheduler", "ServerError"]


def __getattr__(name):  # FastAPI is imported only when the app is wanted
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'tritlm.server' has no attribute {name!r}")
