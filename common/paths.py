"""Folders fedsov writes to: made and probed before any work starts, or refused naming the setting."""

from __future__ import annotations

import tempfile
from pathlib import Path

from common.errors import ConfigError


def writable_folder(path: Path | str, setting: str) -> Path:
    """`path` as a folder this process can write to; `setting` is how the user chose it, e.g. 'workdir=<folder>'.

    Checked up front so that a run fails in its first second, not after its data or model was built.
    """
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ConfigError(
            f"Cannot write to {folder} ({err.strerror or err}): it or a folder above it is a file, "
            f"read-only or not yours. Choose a folder you can write to: {setting}."
        ) from err
    return folder
