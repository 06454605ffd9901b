"""The trainer's resumable state on disk without pickle: tensors in safetensors, the rest in JSON.

A checkpoint folder holds, per rank, ``trainer_state[.rank<r>].safetensors`` (optimizer moments,
RNG states) and ``trainer_state[.rank<r>].json`` (step, scheduler, loader position, logged metrics,
provenance; tensors appear there as ``{"__tensor__": key}`` references). The JSON is written last
and marks the state complete. Reading uses ``safetensors`` and ``json`` only: a file swapped for a
pickle (or anything else) is a corrupt state, one UserError, and no code runs. A ``trainer_state.pt``
(the pickled format of earlier versions) is refused, never loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.lib.errors import UserError

STATE_JSON = "trainer_state.json"
PICKLED = ("trainer_state.pt", "trainer_state.pth", "trainer_state.pkl", "trainer_state.bin")


def file_names(rank: int) -> tuple[str, str]:
    """(json, safetensors) file names of one rank's state."""
    stem = "trainer_state" if rank == 0 else f"trainer_state.rank{rank}"
    return f"{stem}.json", f"{stem}.safetensors"


# ----------------------------------------------------------------------------- encoding
def encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of ``obj``; its tensors and arrays move to ``tensors`` by key."""
    if isinstance(obj, torch.Tensor):
        dtensor = hasattr(obj, "to_local")  # FSDP2 shards: the local shard, re-wrapped on load
        t = obj.to_local() if dtensor else obj
        key = f"t{len(tensors)}"
        tensors[key] = t.detach().cpu().contiguous().clone()  # clone: no shared storage
        return {"__tensor__": key, **({"dtensor": True} if dtensor else {})}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        wide = obj.astype(np.int64) if obj.dtype.kind in "ui" else obj
        tensors[key] = torch.from_numpy(np.ascontiguousarray(wide)).clone()
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(x, tensors) for x in obj]}
    if isinstance(obj, list):
        return [encode(x, tensors) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors) for k, v in obj.items()}
        return {"__dict__": [[encode(k, tensors), encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in the trainer state")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``encode`` (DTensor shards come back as plain local tensors)."""
    if isinstance(obj, list):
        return [decode(x, tensors) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__tuple__" in obj:
        return tuple(decode(x, tensors) for x in obj["__tuple__"])
    if "__dict__" in obj:
        return {decode(k, tensors): decode(v, tensors) for k, v in obj["__dict__"]}
    return {k: decode(v, tensors) for k, v in obj.items()}


# ----------------------------------------------------------------------------- files
def save(directory: Path, rank: int, state: dict) -> None:
    """Write one rank's state into ``directory`` (the tensors first, the JSON marker last)."""
    from safetensors.torch import save_file

    js, st = file_names(rank)
    tensors: dict[str, torch.Tensor] = {}
    doc = encode(state, tensors)
    save_file(tensors, str(directory / st))
    tmp = directory / f".{js}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / js)


def is_complete(directory: Path) -> bool:
    return (directory / STATE_JSON).is_file()


def has_pickle(directory: Path) -> str | None:
    """The name of a pickled trainer state in ``directory``, if any."""
    return next((n for n in PICKLED if (directory / n).exists()), None)


def load(directory: Path, rank: int) -> dict:
    """One rank's state; a UserError (and nothing executed) for a pickle or a corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    js, st = file_names(rank)
    if not (directory / js).is_file() and (name := has_pickle(directory)):
        raise UserError(
            f"the checkpoint holds a pickled trainer state ({name}), which distillery never loads "
            "(a pickle can run code)",
            str(directory / name),
            "delete that checkpoint folder (or pass overwrite=true) and train again",
        )
    try:
        doc = json.loads((directory / js).read_text())
        tensors = load_file(str(directory / st))
        return decode(doc, tensors)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise UserError(
            f"unreadable trainer state ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
            str(directory),
            "delete that checkpoint folder to resume from an earlier one, or pass overwrite=true",
        ) from None
