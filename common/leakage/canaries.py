"""Secret canaries (Carlini et al. 2019, "The Secret Sharer") inserted into a node's training data.

Each canary is a sentence with a random secret in a realistic format. Exposure canaries are
inserted 1, 4 or 16 times; one-run audit canaries (Steinke et al. 2023) are each inserted with
probability 1/2, k times (k = 1 by default) when they are. Secrets come from os.urandom and are kept
only in the node's own state folder, so nobody else knows which canaries exist.
"""

from __future__ import annotations

import json
import os
import secrets
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from common.errors import DataError

# Formats Presidio's recognizers do not scrub, so scrubbing regions keep their canaries. Each
# canary's context (a street, a person) is random too: canaries that shared a prefix across
# clients would pull federated averaging in opposite directions and hide memorisation.
FORMATS = {
    "door-code": ("The door code at {street} is", string.digits, 6),
    "passport": ("The passport number of {person} is", string.ascii_uppercase + string.digits, 8),
    "locker-pin": ("{person}'s parcel locker PIN is", string.digits, 6),
}
CANARY_FILE = "canaries.json"


@dataclass(frozen=True)
class Canary:
    kind: str  # "exposure" or "one-run"
    format: str
    prefix: str
    secret: str
    repetitions: int  # copies inserted into the training data (0: a one-run canary left out)

    @property
    def text(self) -> str:
        return self.with_secret(self.secret)

    def with_secret(self, secret: str) -> str:
        return f"{self.prefix} {secret}"

    @property
    def alphabet(self) -> str:
        return FORMATS[self.format][1]

    @property
    def space_size(self) -> int:
        _, alphabet, length = FORMATS[self.format]
        return len(alphabet) ** length

    def random_secret(self, rng: secrets.SystemRandom) -> str:
        _, alphabet, length = FORMATS[self.format]
        return "".join(rng.choice(alphabet) for _ in range(length))


def make_canaries(
    formats: Sequence[str], repetitions: Sequence[int], one_run: int, one_run_repetitions: int = 1
) -> list[Canary]:
    """Fresh canaries with secrets from the operating system's random source."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise DataError(f"Unknown canary formats {unknown}; choose from {', '.join(FORMATS)}.")
    from faker import Faker

    rng = secrets.SystemRandom()
    fake = Faker("en_US")
    fake.seed_instance(rng.getrandbits(64))

    def prefix(fmt: str) -> str:
        return FORMATS[fmt][0].format(street=fake.street_name(), person=f"{fake.first_name()} {fake.last_name()}")

    canaries = [Canary("exposure", fmt, prefix(fmt), "", reps) for fmt in formats for reps in repetitions]
    for i in range(one_run):
        fmt = formats[i % len(formats)]
        canaries.append(Canary("one-run", fmt, prefix(fmt), "", one_run_repetitions if rng.random() < 0.5 else 0))
    return [Canary(c.kind, c.format, c.prefix, c.random_secret(rng), c.repetitions) for c in canaries]


def load_or_create(
    state_dir: Path, formats: Sequence[str], repetitions: Sequence[int], one_run: int, one_run_repetitions: int = 1
) -> list[Canary]:
    """The node's canaries: created once, then the same ones every run (stable dataset fingerprint)."""
    path = Path(state_dir) / CANARY_FILE
    if path.exists():
        return [Canary(**c) for c in json.loads(path.read_text())["canaries"]]
    canaries = make_canaries(formats, repetitions, one_run, one_run_repetitions)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"canaries": [asdict(c) for c in canaries]}, indent=1))
    os.chmod(tmp, 0o600)  # the secrets are this node's alone
    os.replace(tmp, path)
    return canaries


def redact(canary: Canary) -> str:
    """The canary as the report may show it: the format's words only.

    The secret is blacked out, and so is the made-up name or street in its prefix: a random fake
    name can still be a real user's name, and nothing textual from a node's training data leaves it.
    """
    template = FORMATS[canary.format][0].format(street="[STREET]", person="[PERSON]")
    return f"{template} {chr(0x2588) * len(canary.secret)}"
