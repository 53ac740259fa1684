"""Every architecture tritlm runs, by the name GGUF files give it (`general.architecture`)."""

from .arch import Architecture
from .bitnet import BITNET, BITNET_B158
from .gemma3 import GEMMA3
from .llama import LLAMA
from .qwen3 import QWEN3

FAMILIES = (BITNET_B158, BITNET, LLAMA, QWEN3, GEMMA3)
BY_GGUF_ARCH: dict[str, Architecture] = {name: a for a in FAMILIES for name in a.gguf_archs}
