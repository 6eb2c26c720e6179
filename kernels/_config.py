"""Kernel launch configurations: one ``get_configs()`` per op, tuned files, and the CI collapse.

Each op module defines ``get_configs()`` returning a list of dicts (constexpr block sizes plus
``num_warps`` / ``num_stages``). The first entry is the heuristic default.

* ``MASKRCNN_FAST_SINGLE_CONFIG=1`` collapses every list to its default (CI, reproducible runs).
* ``kernels/configs/<gpu-name>.json`` (written by ``bench/autotune.py``) maps
  ``op -> {shape_bucket: config}``; it is loaded once for the current GPU. A missing, malformed
  or other-GPU file falls back to the defaults with a warning.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from functools import lru_cache
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


def single_config() -> bool:
    return os.environ.get("MASKRCNN_FAST_SINGLE_CONFIG", "0") == "1"


def collapse(configs: list[dict]) -> list[dict]:
    """What ``get_configs()`` returns: all configs, or only the first under the CI switch (ops with a
    per-bucket heuristic default pass it to :func:`pick`, which then always returns it)."""
    return configs[:1] if single_config() else list(configs)


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _current_gpu_name() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()


@lru_cache(maxsize=None)
def load_tuned(gpu_name: str | None = None, config_dir: str | None = None) -> dict:
    """Tuned configs for ``gpu_name`` (default: the current GPU), or ``{}`` with a warning."""
    gpu_name = gpu_name if gpu_name is not None else _current_gpu_name()
    if gpu_name is None:
        return {}
    path = Path(config_dir or CONFIG_DIR) / f"{gpu_slug(gpu_name)}.json"
    if not path.exists():
        warnings.warn(f"no tuned configs for {gpu_name} ({path.name}); using heuristic defaults", stacklevel=2)
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("ops"), dict):
            raise ValueError("expected an object with an 'ops' mapping")
        if data.get("gpu") not in (None, gpu_name):
            raise ValueError(f"file is for GPU {data.get('gpu')!r}, not {gpu_name!r}")
        return data["ops"]
    except (ValueError, OSError) as e:
        warnings.warn(f"ignoring tuned configs {path}: {e}; using heuristic defaults", stacklevel=2)
        return {}


def pick(op: str, bucket: str, configs: list[dict], default: dict | None = None) -> dict:
    """The tuned config for ``(op, bucket)`` if there is one that is still valid, else ``default``
    (a per-bucket heuristic chosen by the op) or the list's first entry."""
    if not single_config():
        tuned = load_tuned().get(op, {}).get(bucket)
        if tuned is not None:
            if tuned in configs:
                return tuned
            warnings.warn(f"tuned config {tuned} for {op}/{bucket} is not in get_configs(); using default",
                          stacklevel=2)
    return default if default is not None else configs[0]


def launch_kwargs(config: dict) -> tuple[dict, dict]:
    """Split a config into (constexpr kwargs, launch options)."""
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    opts = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
    return meta, opts
