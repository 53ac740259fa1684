"""How much memory an engine needs, and how much this process may still take: a model that cannot
fit is refused before anything big is allocated (with no swap, the kernel's OOM killer would end
the process halfway through the load; with swap, the machine would page the weights every token)."""

from __future__ import annotations

import os
from dataclasses import dataclass

GB = 1e9
# what a step needs besides its named buffers (thread stacks, the attention's per-thread buffers,
# NumPy's temporaries): a margin, not a measurement
SLACK = 128 << 20


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes an engine allocates: the arena (ternary weights in their layout, the float head and
    embedding; not counted where they are memory-mapped), the KV cache of one sequence of n_ctx
    tokens, and the scratch of the largest step and of the load (one tensor's file bytes at a time)."""

    weights: int
    floats: int
    kv: int
    scratch: int
    mapped: bool = False  # weights and floats memory-mapped (mmap): the page cache streams them

    @property
    def total(self) -> int:
        return (0 if self.mapped else self.weights + self.floats) + self.kv + self.scratch

    def describe(self, layout: str, n_ctx: int) -> str:
        weights = (f"{(self.weights + self.floats) / GB:.1f} GB of weights in {layout} memory-mapped (not counted)"
                   if self.mapped else f"{self.weights / GB:.1f} GB of weights in {layout}, "
                   f"{self.floats / GB:.2f} GB embedding and head")
        return f"{weights}, {self.kv / GB:.2f} GB KV cache for n_ctx={n_ctx}, {self.scratch / GB:.2f} GB scratch"


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    """MemAvailable: free memory plus what the kernel can reclaim (clean page cache) without swapping."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _stat(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == key:
                    return int(fields[1])
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_room(root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup") -> int | None:
    """Bytes left under the tightest memory limit of this process's cgroup and its parents (cgroup
    v2: memory.max; v1: memory.limit_in_bytes), counting the group's inactive file pages as
    reclaimable; None where no limit is set."""
    dirs = []
    try:
        with open(self_cgroup) as f:
            for line in f:
                hier, controllers, path = line.rstrip("\n").split(":", 2)
                if hier == "0" or "memory" in controllers.split(","):
                    base = root if hier == "0" else os.path.join(root, "memory")
                    parts = [p for p in path.split("/") if p]
                    dirs += [os.path.join(base, *parts[:i]) for i in range(len(parts), -1, -1)]
    except (OSError, ValueError):
        pass
    dirs += [root, os.path.join(root, "memory")]  # a container's own view: its limit at the root
    room = None
    for d in dict.fromkeys(dirs):
        for limit_file, usage_file, stat_key in (("memory.max", "memory.current", "inactive_file"),
                                                 ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                  "total_inactive_file")):
            limit = _read_int(os.path.join(d, limit_file))
            if limit is None or limit >= 1 << 60:  # v1 writes "no limit" as a huge number
                continue
            usage = _read_int(os.path.join(d, usage_file)) or 0
            usage -= min(usage, _stat(os.path.join(d, "memory.stat"), stat_key))
            left = max(0, limit - usage)
            room = left if room is None else min(room, left)
    return room


def _address_space_room(status: str = "/proc/self/status") -> int | None:
    """What an address-space limit (RLIMIT_AS, `ulimit -v`) leaves beyond this process's VmSize;
    None without a limit."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, AttributeError, OSError, ValueError):
        return None
    if limit == resource.RLIM_INFINITY:
        return None
    return max(0, limit - _stat(status, "VmSize:") * 1024)  # (kB; a field name then spaces)


def available_memory() -> int | None:
    """Bytes this process may still allocate without swapping: MemAvailable (Linux), else the
    free physical pages (os.sysconf), and no more than a cgroup memory limit or an address-space
    limit leaves; None where nothing tells."""
    available = _meminfo_available()
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = None
    for room in (_cgroup_room(), _address_space_room()):
        if room is not None:
            available = room if available is None else min(available, room)
    return available


def check_fits(options: list[tuple[str, MemoryNeed]], n_ctx: int, kv_per_token: int) -> int | None:
    """ValueError "needs N GB, M GB available" if the first of `options` (description, need) does
    not fit, naming what would: each other option at this n_ctx, or with the largest n_ctx that
    fits beside it. TRITLM_MEMORY_CHECK=0 skips the check. Returns the bytes available (None:
    unknown)."""
    available = available_memory()
    (what, need) = options[0]
    if available is None or need.total <= available or os.environ.get("TRITLM_MEMORY_CHECK", "1") == "0":
        return available
    fits = []
    for i, (alt_what, alt) in enumerate(options):
        max_ctx = (available - (alt.total - alt.kv)) // kv_per_token if kv_per_token else 0
        if i and alt.total <= available:
            fits.append(alt_what)
        elif 1 <= max_ctx < n_ctx:
            fits.append(f"{alt_what} and n_ctx={int(max_ctx)} or less" if i else f"n_ctx={int(max_ctx)} or less")
    advice = ("; it would fit with " + ", or with ".join(fits)) if fits else \
        "; no weight layout or context makes it fit: free memory, or use a machine with more"
    raise ValueError(f"this model needs {need.total / GB:.1f} GB, {available / GB:.1f} GB available "
                     f"({need.describe(what, n_ctx)}){advice} (TRITLM_MEMORY_CHECK=0 skips this check)")
