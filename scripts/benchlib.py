"""What every benchmark script shares: the device it ran on and how results are written."""

from __future__ import annotations

import json
from pathlib import Path


def device_name() -> str:
    import torch

    return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"


def write_results(out_dir: Path, name: str, record: dict, lines: list[str]) -> None:
    """`<name>.json` (the record) and `<name>.md` (the table), then the table on stdout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
