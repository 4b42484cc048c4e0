"""A configured model written to a folder that a host without internet serves from, and the check of one.

``export`` loads the model as a worker does (tokenizer, config and weights; a GGUF checkpoint comes out
dequantised, as transformers loads it) and writes it with ``save_pretrained`` as safetensors, with a
manifest: where it came from, its registry settings, and the sha256 of every file. The folder is an ordinary
Hugging Face checkpoint: give it as the ``source`` of a model entry (with ``HF_HUB_OFFLINE=1``) and it
serves the same vectors and the same greedy text. ``verify`` recomputes the digests, so a copy that was cut
short or changed on its way to the other host is caught before a worker loads it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from producer.settings import Kind, ModelEntry
from workers.errors import WorkerError

MANIFEST = "inferq-manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


class ExportError(WorkerError):
    """The model cannot be exported to that folder, or an exported folder does not verify."""


def _loader(kind: Kind) -> Any:
    # imported here: each pulls in its transformers model classes
    if kind == "embed":
        from workers.models.embed import PooledEmbedder
        return PooledEmbedder
    if kind == "classify":
        from workers.models.classify import SequenceClassifier
        return SequenceClassifier
    from workers.models.generate import CausalGenerator
    return CausalGenerator


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def export(kind: Kind, alias: str, entry: ModelEntry, target: Path) -> dict[str, Any]:
    """Write the model of ``alias`` to ``target`` (absent or empty) and return its manifest."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(f"{target} exists and is not an empty folder; export into a new one")
    loaded = _loader(kind).load(alias, entry, torch.device("cpu"), True, dense=True).loaded
    target.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(target, safe_serialization=True)
    loaded.tokenizer.save_pretrained(target)
    files = sorted(path for path in target.rglob("*") if path.is_file())
    # the registry settings that serve it as before; source and gguf_file describe where it came from
    settings = entry.model_dump(exclude={"source", "gguf_file", "revision", "default"})
    manifest: dict[str, Any] = {
        "inferq_manifest": MANIFEST_VERSION, "kind": kind, "alias": alias,
        "exported_from": {"source": entry.source, "gguf_file": entry.gguf_file, "revision": entry.revision,
                          "location": loaded.location},
        "dtype": str(loaded.dtype).removeprefix("torch."), "settings": settings,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {path.relative_to(target).as_posix(): sha256(path) for path in files},
    }
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify(target: Path) -> tuple[dict[str, Any], list[str]]:
    """The folder's manifest, and what is wrong with the folder against it (nothing: it verifies)."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except FileNotFoundError:
        raise ExportError(f"{target} has no {MANIFEST}: it was not written by `inferq models export`") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{target / MANIFEST} cannot be read: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ExportError(f"{target / MANIFEST} is not an inferq manifest (no 'files' object)")
    problems = []
    for name, expected in sorted(manifest["files"].items()):
        path = target / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256(path) != expected:
            problems.append(f"{name}: sha256 differs from the manifest's (changed or cut short)")
    listed = set(manifest["files"]) | {MANIFEST}
    problems += [f"{path.relative_to(target).as_posix()}: not in the manifest"
                 for path in sorted(target.rglob("*")) if path.is_file()
                 and path.relative_to(target).as_posix() not in listed]
    return manifest, problems
