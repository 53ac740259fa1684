"""The OpenAI-compatible server: `create_app(llm)` (FastAPI, the `[server]` extra) over a
continuous-batching `Scheduler`, run by uvicorn with `uvicorn_options()`. Run it with
`tritlm serve`; see docs/SERVER.md."""

from .scheduler import Event, Job, Scheduler, ServerError

__all__ = ["create_app", "uvicorn_options", "Event", "Job", "Scheduler", "ServerError"]


def __getattr__(name):  # FastAPI and uvicorn are imported only when the app is wanted
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "uvicorn_options":
        from .transport import uvicorn_options

        return uvicorn_options
    raise AttributeError(f"module 'tritlm.server' has no attribute {name!r}")
