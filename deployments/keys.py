"""The endpoint's keys: a primary and a secondary scoring key, and a separate admin key.

They live in ``<state_dir>/endpoint/keys.json`` with 0600 permissions, made on first use and regenerable one at
a time (regenerate the secondary, move clients to it, then regenerate the primary: no downtime). The environment
wins over the file: ``FINETUNE_PHI_ENDPOINT_KEY`` replaces the primary key, ``FINETUNE_PHI_ADMIN_KEY`` the admin
key (for keys kept in a secret store). Keys are compared in constant time and never logged; only
``finetune-phi endpoint keys`` prints them, on request.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path
from typing import Literal

from tasks.state import atomic_write_json, read_json

KEYS_FILE = "keys.json"
ENV_PRIMARY = "FINETUNE_PHI_ENDPOINT_KEY"
ENV_ADMIN = "FINETUNE_PHI_ADMIN_KEY"
KeyName = Literal["primary", "secondary", "admin"]
KEY_NAMES: tuple[KeyName, ...] = ("primary", "secondary", "admin")


def _new_key() -> str:
    return secrets.token_urlsafe(32)


def _keys_path(endpoint_dir: str | Path) -> Path:
    return Path(endpoint_dir) / KEYS_FILE


def ensure_keys(endpoint_dir: str | Path) -> Path:
    """Create the key file (0600) with fresh keys if it is missing or incomplete. Returns its path."""
    path = _keys_path(endpoint_dir)
    stored = read_json(path, default={}) or {}
    if all(isinstance(stored.get(name), str) and stored[name] for name in KEY_NAMES):
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return path
    keys = {name: stored.get(name) or _new_key() for name in KEY_NAMES}
    atomic_write_json(path, keys, permissions=0o600)
    return path


def read_keys(endpoint_dir: str | Path) -> dict[str, str]:
    """All three keys, the environment's taking precedence. Creates the file on first use."""
    keys = dict(read_json(ensure_keys(endpoint_dir), default={}))
    if os.environ.get(ENV_PRIMARY):
        keys["primary"] = os.environ[ENV_PRIMARY]
    if os.environ.get(ENV_ADMIN):
        keys["admin"] = os.environ[ENV_ADMIN]
    return keys


def read_admin_key(endpoint_dir: str | Path) -> str:
    return read_keys(endpoint_dir)["admin"]


def regenerate_key(endpoint_dir: str | Path, name: KeyName) -> str:
    """Replace one key with a fresh one; a running server picks it up on its next request."""
    if name not in KEY_NAMES:
        raise ValueError(f"unknown key {name!r}; choose one of {', '.join(KEY_NAMES)}")
    path = ensure_keys(endpoint_dir)
    keys = dict(read_json(path, default={}))
    keys[name] = _new_key()
    atomic_write_json(path, keys, permissions=0o600)
    return keys[name]


def matches(candidate: str | None, *valid: str | None) -> bool:
    """Constant-time check of ``candidate`` against each valid key (every key is compared, match or not)."""
    if not candidate:
        return False
    given = candidate.encode()
    found = False
    for key in valid:
        if key:
            found |= hmac.compare_digest(given, key.encode())
    return found


class KeyStore:
    """Keys for a running server: re-read when the file changes, so regeneration needs no restart."""

    def __init__(self, endpoint_dir: str | Path) -> None:
        self.endpoint_dir = Path(endpoint_dir)
        self._stamp: float | None = None
        self._keys: dict[str, str] = {}
        self.refresh()

    def refresh(self) -> dict[str, str]:
        path = _keys_path(self.endpoint_dir)
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if stamp is None or stamp != self._stamp or not self._keys:
            self._keys = read_keys(self.endpoint_dir)
            self._stamp = _keys_path(self.endpoint_dir).stat().st_mtime_ns
        return self._keys

    def is_scoring_key(self, candidate: str | None) -> bool:
        keys = self.refresh()
        return matches(candidate, keys.get("primary"), keys.get("secondary"))

    def is_admin_key(self, candidate: str | None) -> bool:
        return matches(candidate, self.refresh().get("admin"))
