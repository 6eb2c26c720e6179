"""Checkpoints that survive a kill at any moment, and that say what model they hold.

``save`` writes to a temporary file in the same folder, flushes and fsyncs it, then renames it over
the target (atomic on POSIX), and fsyncs the folder so the rename itself is durable. A crash
mid-write leaves the previous checkpoint untouched and at worst a stray ``.tmp`` file.

Every checkpoint records ``format`` (this project's tag), the model's ``arch`` and its config, so
loading a checkpoint of another model (a torchvision one, a different backbone or class count)
fails with one clear line instead of a wall of ``state_dict`` key errors.
"""
from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

from maskrcnn_fast.errors import UserError

FORMAT = "maskrcnn_fast/1"


def save(obj: dict, path: str) -> None:
    """Atomically write ``obj`` (with ``torch.save``) to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read(path: str) -> dict:
    """The raw checkpoint dict; a missing or unreadable file is a ``UserError``."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle garbage, ...
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def is_ours(ckpt) -> bool:
    return isinstance(ckpt, dict) and ckpt.get("format") == FORMAT


def load(path: str, expect_arch: str | None = None, expect_config: dict | None = None) -> dict:
    """Read one of our checkpoints and check it holds the expected model.

    ``expect_config`` entries (e.g. ``num_classes``, ``backbone``) must match the stored model config.
    """
    ckpt = read(path)
    if not is_ours(ckpt):
        what = "a torchvision/plain state_dict" if isinstance(ckpt, dict) and any(
            isinstance(v, torch.Tensor) for v in ckpt.values()) else "not a maskrcnn-fast checkpoint"
        raise UserError(f"checkpoint {path} is {what}; expected a maskrcnn-fast training checkpoint")
    if expect_arch is not None and ckpt.get("arch") != expect_arch:
        raise UserError(f"checkpoint {path} holds a {ckpt.get('arch')!r} model, expected {expect_arch!r}")
    if expect_config:
        stored = ckpt.get("model_config", {})
        diffs = [f"{k}={stored.get(k)!r} (expected {v!r})" for k, v in expect_config.items()
                 if k in stored and _norm(stored[k]) != _norm(v)]
        if diffs:
            raise UserError(f"checkpoint {path} is for another model: " + ", ".join(diffs))
    return ckpt


def _norm(v):
    return tuple(_norm(x) for x in v) if isinstance(v, (list, tuple)) else v


def load_model_state(model: torch.nn.Module, state: dict, path: str) -> None:
    """``load_state_dict`` with its key/shape mismatch turned into one clear line."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UserError(f"checkpoint {path} does not fit this model: {detail[:200]}") from None


# RNG states: stored per rank so that a resumed run draws the same random numbers
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
