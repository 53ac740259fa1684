from .engine import Engine, Sequence

__all__ = ["Engine", "Sequence"]
