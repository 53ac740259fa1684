"""tritlm: ternary (BitNet b1.58) language models on the CPU, from Python."""

__version__ = "0.1.0"
