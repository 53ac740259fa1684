"""Where a tensor's bytes lie in a file, to read them when they are needed."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FileRegion:
    """`nbytes` bytes of a file from `offset`, read when needed with plain reads: pages read
    through a memory map would count toward the process's memory as long as the map lives."""

    path: str
    offset: int
    nbytes: int

    def read_into(self, out: np.ndarray, *, drop_behind: bool = False) -> None:
        """Fill `out`, a contiguous buffer of exactly nbytes. drop_behind: then drop the region's
        pages from the page cache (Linux), for a reader that keeps its own copy: the file then
        does not sit in memory a second time (loading a 17 GB model on a 24 GB machine would
        otherwise push everything else's cached pages, or with swap its memory, out)."""
        view = memoryview(out).cast("B")
        if view.nbytes != self.nbytes:
            raise ValueError(f"{self.path}: a buffer of {view.nbytes} bytes for {self.nbytes}")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            done = 0
            while done < self.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{self.path} ends inside a tensor: was it changed after it was opened?")
                done += n
            if drop_behind and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), self.offset, self.nbytes, os.POSIX_FADV_DONTNEED)

    def read(self, *, drop_behind: bool = False) -> np.ndarray:
        out = np.empty(self.nbytes, np.uint8)
        self.read_into(out, drop_behind=drop_behind)
        return out
