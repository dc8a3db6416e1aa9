"""Built artefacts (datasets, tokenizers, trained models) cached by stage: one key function, one atomic build."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def stage_key(*parts: object) -> str:
    """A short hash of everything that shapes a stage, so a changed recipe builds anew beside the old one."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_stage(directory: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary folder and rename it into place: concurrent builders never see half a stage."""
    if directory.is_dir():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        build(tmp)
        os.rename(tmp, directory)
    except OSError:
        if not directory.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
