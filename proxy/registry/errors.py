"""Why a registry operation was refused: the family is defined with every other exception in
`proxy.errors` (drawn there); the registry's modules know its members by these short names."""

from __future__ import annotations

from ..errors import ManagedByConfig, NameTaken, RegistryError
from ..errors import RegistryConflict as Conflict
from ..errors import RegistryNotFound as NotFound
from ..errors import RegistryUnavailable as StoreFailed
from ..errors import RegistryUnknownTeam as UnknownTeam

__all__ = ["Conflict", "ManagedByConfig", "NameTaken", "NotFound", "RegistryError", "StoreFailed", "UnknownTeam"]
