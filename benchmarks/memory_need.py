"""python benchmarks/memory_need.py PRESET N_CTX [LAYOUT]: what the engine would need for a dummy
preset and whether it fits here; no file needed (the check comes before any read)."""
import sys
import numpy as np
from tritlm import _native
from tritlm.bench.dummy import dummy_config
from tritlm.formats.region import FileRegion
from tritlm.models.loader import StoredTernary, FloatMatrix, tensor_shape
from tritlm.models.arch import PROJECTIONS
from tritlm.quant import layouts
from tritlm.runtime import Engine, memory

class Stop(Exception): pass
def stop(n): raise Stop(n)
_native.empty_streaming = stop
preset, n_ctx, layout = sys.argv[1], int(sys.argv[2]), (sys.argv[3] if len(sys.argv) > 3 else None)
c = dummy_config(preset)
t = {"token_embd": FloatMatrix(FileRegion("x", 0, c.vocab_size * c.hidden_size * 2), "F16", c.vocab_size, c.hidden_size),
     "output_norm": np.ones(c.hidden_size, np.float32)}
for i in range(c.n_layers):
    for kind in c.architecture.tensors:
        shape = tensor_shape(c, kind)
        t[f"blk.{i}.{kind}"] = (StoredTernary("I2_S", shape, FileRegion("x", 0, layouts.i2s_nbytes(shape)))
                                if kind in PROJECTIONS else np.ones(shape, np.float32))
print(f"MemAvailable/cgroup: {memory.available_memory() / 1e9:.2f} GB")
try:
    Engine(c, t, n_ctx=n_ctx, weight_layout=layout)
except Stop as e:
    print(f"{preset} n_ctx={n_ctx} {layout}: fits; arena {e.args[0] / 1e9:.2f} GB")
except ValueError as e:
    print(f"{preset} n_ctx={n_ctx} {layout}: {e}")
