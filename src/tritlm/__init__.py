"""tritlm: ternary (BitNet b1.58) language models on the CPU, from Python.

    from tritlm import LLM
    llm = LLM("ggml-model-i2_s.gguf")
    print(llm.generate("The capital of France is", max_tokens=16))
"""

__version__ = "0.1.0"
__all__ = ["LLM", "__version__"]


def __getattr__(name):  # import the engine only when it is used: `tritlm` itself loads fast
    if name == "LLM":
        from .api import LLM

        return LLM
    raise AttributeError(f"module 'tritlm' has no attribute {name!r}")
