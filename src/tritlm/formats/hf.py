"""A Hugging Face model directory: config.json and one or several safetensors files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .files import model_file, read_json
from .region import FileRegion
from .safetensors import SafetensorsFile

INDEX = "model.safetensors.index.json"


def is_hf_directory(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


class HFCheckpoint:
    """Tensors by name across the shards of one checkpoint, and its config.json. Every file it
    opens is confined to the directory (`files.model_file`)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not is_hf_directory(self.directory):
            raise ValueError(f"{self.directory}: no config.json (not a Hugging Face model directory)")
        config_path = model_file(self.directory, "config.json")
        self.config = read_json(config_path)
        if not isinstance(self.config, dict):
            raise ValueError(f"{config_path}: not a JSON object")
        index_path = self.directory / INDEX
        if os.path.lexists(index_path):
            index = read_json(model_file(self.directory, INDEX))
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index_path}: no weight_map from tensor names to shard file names")
            shards = sorted(set(weight_map.values()))
        elif os.path.lexists(self.directory / "model.safetensors"):
            shards, weight_map = ["model.safetensors"], None
        else:
            raise ValueError(f"{self.directory}: no model.safetensors or {INDEX}")
        self._files = {}
        try:
            for shard in shards:
                self._files[shard] = SafetensorsFile(model_file(self.directory, shard))
        except BaseException:
            self.close()
            raise
        self._where = {}
        for shard, file in self._files.items():
            for name in file.tensors:
                if weight_map is not None and weight_map.get(name) != shard:
                    continue
                self._where[name] = file
        missing = [n for n, shard in (weight_map or {}).items() if n not in self._where]
        if missing:
            self.close()
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
