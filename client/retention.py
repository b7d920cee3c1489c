"""A node's retention: ledger backups, made by `fedsov ledger backup` and deleted once its policy's time is up.

A ledger backup is a verified copy of the ledger folder's keyed logs (the privacy ledger, the erasure register
and the transfer-scope register, each with its .head file) in `<ledger folder>/backups/<UTC time>/`, with a
`backup.json` naming the heads it holds. It is what a node restores when its ledger is damaged, so it is
evidence of the privacy spent and of the erasures honoured; `retention.ledger_backup_days` says how long a
backup is kept. The live ledger and the audit log are never deleted: they are the evidence itself, and a
node refuses to train without them. Copies kept elsewhere (rsync of the backups folder) are yours to expire.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from client.erasure import ERASURES_FILE
from client.settings import LEDGER_FILE, NodeFolders, NodeSettings, node_audit
from client.transfers import SCOPE_FILE
from common.audit import AuditLog, EvidenceKey, HashChainLog
from common.errors import LedgerError
from common.policy import RegionPolicy
from common.retention import Due, delete, due

BACKUPS = "backups"
BACKUP_INFO = "backup.json"
BACKED_UP = (LEDGER_FILE, ERASURES_FILE, SCOPE_FILE)


def backup_ledger(folders: NodeFolders | NodeSettings) -> Path:
    """Copy the ledger folder's keyed logs, verified before and after, into a new backup; log it."""
    key = EvidenceKey.load(folders.ledger_key_dir)
    logs = [folders.ledger_dir / name for name in BACKED_UP if HashChainLog.files_exist(folders.ledger_dir / name)]
    if folders.ledger_dir / LEDGER_FILE not in logs:
        raise LedgerError(
            f"No privacy ledger in {folders.ledger_dir}: nothing to back up. Check --ledger-dir (the "
            "node's state folder unless `fedsov node start` was given one)."
        )
    heads = {}
    for log in logs:
        checked = HashChainLog(log, key).verify()
        if not checked.ok:
            raise LedgerError(
                f"Not backed up: {checked.describe(log)}. A backup of a damaged log would be restored "
                "later as if it were sound; restore the log from an earlier backup first."
            )
        heads[log.name] = asdict(HashChainLog(log, key).chain_head())
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = folders.ledger_dir / BACKUPS / stamp
    n = 1
    while target.exists():
        n += 1
        target = folders.ledger_dir / BACKUPS / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for log in logs:
        shutil.copy2(log, target / log.name)
        shutil.copy2(log.with_name(log.name + ".head"), target / (log.name + ".head"))
        copied = HashChainLog(target / log.name, key).verify()
        if not copied.ok:
            shutil.rmtree(target)
            raise LedgerError(
                f"The backup copy failed verification ({copied.describe(target / log.name)}), perhaps "
                "written to while it was copied; nothing was kept. Run `fedsov ledger backup` again."
            )
    (target / BACKUP_INFO).write_text(
        json.dumps(
            {
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "source": str(folders.ledger_dir),
                "key_dir": str(folders.ledger_key_dir),
                "heads": heads,
            },
            indent=1,
        )
    )
    node_audit(folders).record(
        "ledger_backup", "created", reason=f"{len(logs)} log(s) copied to {target}", path=str(target), heads=heads
    )
    return target


def ledger_backups(ledger_dir: Path) -> list[Path]:
    folder = ledger_dir / BACKUPS
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / BACKUP_INFO).is_file()) if folder.is_dir() else []


def expired_backups(folders: NodeFolders | NodeSettings, policy: RegionPolicy, now: float | None = None) -> list[Due]:
    days = policy.retention.ledger_backup_days
    return due(
        ledger_backups(folders.ledger_dir),
        "ledger backup",
        days,
        f"{folders.region} ({policy.law}): retention.ledger_backup_days = {days}",
        time.time() if now is None else now,
    )


def enforce_node_retention(
    folders: NodeFolders | NodeSettings, policy: RegionPolicy, audit: AuditLog, now: float | None = None
) -> list[Due]:
    """Delete the ledger backups older than the policy allows, each logged in the node's audit log."""
    expired = expired_backups(folders, policy, now)
    delete(expired, audit)
    return expired
