"""How a manifest names the models a dataset was made with: inside the run as a run-relative
path (the run still resolves after a move to another folder, machine or bucket), else absolute."""

from __future__ import annotations

from pathlib import Path


def run_root_of(directory: str | Path) -> Path:
    """The run (or round) folder holding a dataset folder: ``<run>/tokens`` or
    ``<run>/selected/<name>``."""
    d = Path(directory)
    return d.parent.parent if d.parent.name == "selected" else d.parent


def model_entries(models: dict[str, str | Path], fingerprints: dict, run_root: Path) -> dict:
    """role -> {"run_path": folder inside the run | "path": absolute folder elsewhere,
    "fingerprint": the role's fingerprint (if known)}. A model inside the run (an SFT checkpoint)
    is named relative to it, not by this machine's path (a mirror, a mount): the run still
    resolves after a move to another folder, machine or bucket, and the fingerprint (content)
    says whether it is still the same model."""
    out = {}
    for role, path in models.items():
        if not path:
            continue
        p = Path(path).resolve()
        try:
            where = {"run_path": p.relative_to(Path(run_root).resolve()).as_posix()}
        except ValueError:
            where = {"path": str(p)}
        out[role] = {**where, "fingerprint": fingerprints.get(role)}
    return out


def shown_path(path: str | Path, run_root: Path, run_dir: str) -> str:
    """A model folder as a manifest's ``extra`` shows it: inside the run as ``<run_dir>/<rel>``
    (``run_dir`` as the user gave it: a folder or an ``s3://`` URI), else the folder itself."""
    try:
        rel = Path(path).resolve().relative_to(Path(run_root).resolve()).as_posix()
    except ValueError:
        return str(path)
    return f"{str(run_dir).rstrip('/')}/{rel}"


def model_path(
    m: dict, role: str, legacy: str | None = None, directory: str | Path | None = None
) -> str | None:
    """A model folder a manifest names: ``models.<role>`` (``run_path`` resolved against the run
    holding ``directory``, the manifest's dataset folder; else the absolute ``path``), else the
    legacy ``extra[legacy]`` value (relative to the directory the stage ran in), else None."""
    entry = (m.get("models") or {}).get(role)
    if entry and "run_path" in entry:
        if directory is None:
            raise ValueError(f"models.{role} is inside the run: pass the dataset folder")
        return str(run_root_of(directory) / entry["run_path"])
    if entry:
        return entry["path"]
    return (m.get("extra") or {}).get(legacy) if legacy else None
