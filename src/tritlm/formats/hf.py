"""A Hugging Face model directory: config.json and one or several safetensors files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .region import FileRegion
from .safetensors import SafetensorsFile


def is_hf_directory(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


class HFCheckpoint:
    """Tensors by name across the shards of one checkpoint, and its config.json."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{self.directory}: no config.json (not a Hugging Face model directory)")
        try:
            self.config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None
        index_path = self.directory / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: no weight_map")
            shards = sorted(set(weight_map.values()))
        elif (self.directory / "model.safetensors").is_file():
            shards, weight_map = ["model.safetensors"], None
        else:
            raise ValueError(f"{self.directory}: no model.safetensors or model.safetensors.index.json")
        self._files = {shard: SafetensorsFile(self.directory / shard) for shard in shards}
        self._where = {}
        for shard, file in self._files.items():
            for name in file.tensors:
                if weight_map is not None and weight_map.get(name) != shard:
                    continue
                self._where[name] = file
        missing = [n for n, shard in (weight_map or {}).items() if n not in self._where]
        if missing:
            raise ValueError(f"{index_path}: tensors listed but not found in their shard: {missing[:5]}")

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str):
        """dtype, shape and byte range of a tensor, as its safetensors header declares them."""
        return self._where[name].info(name)

    def region(self, name: str):
        """Where a tensor's bytes lie, to read them later."""
        info = self.info(name)
        return FileRegion(self._where[name].path, info.begin, info.end - info.begin)

    def array(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ValueError(f"{self.directory}: checkpoint has no tensor {name!r}")
        return self._where[name].array(name)

    def close(self):
        for file in self._files.values():
            file.close()
