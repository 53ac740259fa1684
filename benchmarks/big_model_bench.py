"""python benchmarks/big_model_bench.py MODEL LAYOUT|default N_GEN: load a (big) model and measure
it: load time, bytes read, peak RSS, tg at 1 and 2 threads with the roofline (tritlm.bench.model.run),
/proc/meminfo before and after."""
import json, os, sys, time
from tritlm import kernels
from tritlm.bench import model

def meminfo():
    with open("/proc/meminfo") as f:
        return {l.split(":")[0]: int(l.split()[1]) // 1024 for l in f if l.split(":")[0] in
                ("MemTotal", "MemFree", "MemAvailable", "Cached", "AnonPages", "AnonHugePages", "Dirty")}

path, layout, n_gen = sys.argv[1], (sys.argv[2] if sys.argv[2] != "default" else None), int(sys.argv[3])
print("isa", kernels.default_isa(), "best_layout(8192)", kernels.best_layout(k=8192), "layout asked", layout, flush=True)
print("before", meminfo(), "loadavg", os.getloadavg(), flush=True)
report = model.run(path, prompts=(), n_gen=n_gen, threads=(1, 2), repeats=2, weight_layout=layout)
print("after", meminfo(), "loadavg", os.getloadavg(), flush=True)
print(model.markdown(report))
print(json.dumps(report))
