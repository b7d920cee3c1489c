"""What every benchmark script shares: the micro model, the device it ran on and how results are written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

# Quick (smoke) mode: a micro embedded model, same code path as the default (tests/conftest.py uses the same).
MICRO = ["model.embedded.n_layer=2", "model.embedded.n_head=2", "model.embedded.n_embd=64",
         "model.embedded.corpus_documents=3000", "model.embedded.steps=150"]


def device_name() -> str:
    import torch

    return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"


def write_results(out_dir: Path, name: str, record: dict, lines: list[str],
                  plot: Callable[[object], None] | None = None) -> None:
    """`<name>.json` (the record), `<name>.md` (the table) and, given `plot(figure)`, `<name>.png`;
    then the table on stdout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and CI
        from matplotlib import pyplot

        figure = pyplot.figure(figsize=(9, 4))
        plot(figure)
        figure.tight_layout()
        figure.savefig(out_dir / f"{name}.png", dpi=110)
        pyplot.close(figure)
        record = {**record, "plot": f"{name}.png"}
        lines = [*lines, "", f"![{name}]({name}.png)"]
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
