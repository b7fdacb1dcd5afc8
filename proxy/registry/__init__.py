"""Keys and teams created at runtime, kept in the store beside the counters.

Registry(backend, config_keys=..., config_teams=...)   admin operations (create/update/rotate/
                                                       revoke keys; create/update/delete teams;
                                                       audit), each versioned and audited
RegistryCache(backend)                                 each replica's in-memory copy: lookup by
                                                       sha256, refreshed by a background poll
RedisRegistryBackend / MemoryRegistryBackend           the store seam
permissions                                            what a (scoped) admin key may do
"""

from .cache import CachedKey, RegistryCache
from .entries import Budgets, EndUserDefaults, KeyEntry, KeyPatch, KeySpec, TeamEntry, TeamPatch, TeamSpec
from .errors import Conflict, ManagedByConfig, NameTaken, NotFound, RegistryError, StoreFailed, UnknownTeam
from .layout import RegistryLayout
from .registry import Created, Registry
from .store import MemoryRegistryBackend, RedisRegistryBackend, RegistryBackend

__all__ = [
    "Budgets",
    "CachedKey",
    "Conflict",
    "Created",
    "EndUserDefaults",
    "KeyEntry",
    "KeyPatch",
    "KeySpec",
    "ManagedByConfig",
    "MemoryRegistryBackend",
    "NameTaken",
    "NotFound",
    "RedisRegistryBackend",
    "Registry",
    "RegistryBackend",
    "RegistryCache",
    "RegistryError",
    "RegistryLayout",
    "StoreFailed",
    "TeamEntry",
    "TeamPatch",
    "TeamSpec",
    "UnknownTeam",
]
