"""Tenants: who may call the server, and which adapters each one sees.

`--api-keys FILE` names a TOML file with one table per tenant:

    [tenants.alice]
    key_sha256 = "5e88...c3"          # SHA-256 (hex) of alice's key; the key itself is never stored
    adapters = ["sql", "alice-*"]     # names or glob patterns of the adapters she may use
    max_concurrent = 4                # requests at once (waiting + running); default: no limit
    can_load = true                   # may POST /v1/load_lora_adapter (loads become hers)
    base_model = true                 # may use the base model alone (default true)
    metrics = false                   # may read /metrics (it names running adapters)

`edgelora new-key NAME` prints a fresh key and its table. Keys arrive as
`Authorization: Bearer KEY` or `X-Api-Key: KEY`. A presented key is hashed and compared with
every tenant's hash in constant time (hmac.compare_digest, no early exit), so neither timing
nor logs reveal a key. Without the file the server is open: one anonymous tenant that sees
everything (and the server binds to loopback by default).

A tenant sees only its adapters: it does not find the others in /v1/models or /lora-adapters,
and naming one gets the same 404 as naming an adapter that does not exist.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgelora_np.errors import EdgeLoraError

if sys.version_info >= (3, 11):
    import tomllib
else:                                   # pragma: no cover - Python 3.10
    import tomli as tomllib

_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELDS = {"key_sha256", "adapters", "max_concurrent", "can_load", "base_model", "metrics"}


@dataclass(frozen=True)
class Tenant:
    name: str
    patterns: tuple[str, ...] = ("*",)     # adapter names or globs it may use
    max_concurrent: int | None = None      # None = no limit
    can_load: bool = True
    base_model: bool = True
    metrics: bool = True
    owned: set[str] = field(default_factory=set, compare=False)   # adapters it loaded at runtime

    def sees(self, adapter: str) -> bool:
        return adapter in self.owned or any(fnmatch.fnmatchcase(adapter, p) for p in self.patterns)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(name: str) -> tuple[str, str]:
    """A fresh random key for tenant `name`, and the TOML table that admits it."""
    key = "el-" + secrets.token_urlsafe(24)
    table = (f"[tenants.{name}]\nkey_sha256 = \"{hash_key(key)}\"\nadapters = []\n"
             f"max_concurrent = 4\ncan_load = false\n")
    return key, table


class Tenants:
    """The tenants of an --api-keys file."""

    def __init__(self, tenants: dict[str, tuple[bytes, Tenant]]):
        self._by_name = tenants                 # name -> (key digest, tenant)

    @classmethod
    def load(cls, path: str | Path) -> Tenants:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as e:
            raise EdgeLoraError(f"{path}: cannot read the API keys file: {e.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise EdgeLoraError(f"{path}: not valid TOML: {e}") from None
        tables = data.get("tenants")
        if not isinstance(tables, dict) or not tables:
            raise EdgeLoraError(f"{path}: no [tenants.NAME] tables")
        tenants, digests = {}, set()
        for name, t in tables.items():
            where = f"{path}: tenant {name!r}"
            if not isinstance(t, dict):
                raise EdgeLoraError(f"{where}: must be a table")
            unknown = set(t) - _FIELDS
            if unknown:
                raise EdgeLoraError(f"{where}: unknown field(s) {sorted(unknown)} "
                                    f"(known: {sorted(_FIELDS)})")
            digest = t.get("key_sha256")
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest.lower()):
                raise EdgeLoraError(f"{where}: key_sha256 must be 64 hex digits (the SHA-256 of "
                                    "its key; `edgelora new-key NAME` makes one)")
            if digest.lower() in digests:
                raise EdgeLoraError(f"{where}: the same key as another tenant")
            digests.add(digest.lower())
            patterns = t.get("adapters", [])
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise EdgeLoraError(f"{where}: adapters must be a list of names or glob patterns")
            limit = t.get("max_concurrent")
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                      or limit < 1):
                raise EdgeLoraError(f"{where}: max_concurrent must be a positive integer")
            flags = {}
            for flag, default in (("can_load", False), ("base_model", True), ("metrics", False)):
                flags[flag] = t.get(flag, default)
                if not isinstance(flags[flag], bool):
                    raise EdgeLoraError(f"{where}: {flag} must be true or false")
            tenants[name] = (bytes.fromhex(digest), Tenant(name, tuple(patterns), limit, **flags))
        return cls(tenants)

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant holding `key`, or None. Compares against every tenant in constant time."""
        if not key:
            return None
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for stored, tenant in self._by_name.values():
            if hmac.compare_digest(stored, digest):
                found = tenant
        return found

    def __iter__(self):
        return (tenant for _, tenant in self._by_name.values())
