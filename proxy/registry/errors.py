"""Why a registry operation was refused. `code` is the OpenAI-style error code the admin API
returns, `status` its HTTP status:

    RegistryError
    ├── NotFound            404 not_found
    ├── ManagedByConfig     409 managed_by_config   (the name belongs to the config file)
    ├── NameTaken           409 name_taken          (a runtime entry has it)
    ├── Conflict            409 conflict            (changed concurrently, or still in use)
    ├── UnknownTeam         400 unknown_team
    └── StoreFailed         503 store_unavailable   (the store did not answer)

Messages name entries, never a key or a digest.
"""

from __future__ import annotations


class RegistryError(Exception):
    status = 400
    code = "invalid_request"

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class NotFound(RegistryError):
    status = 404
    code = "not_found"


class ManagedByConfig(RegistryError):
    status = 409
    code = "managed_by_config"


class NameTaken(RegistryError):
    status = 409
    code = "name_taken"


class Conflict(RegistryError):
    status = 409
    code = "conflict"


class UnknownTeam(RegistryError):
    status = 400
    code = "unknown_team"


class StoreFailed(RegistryError):
    status = 503
    code = "store_unavailable"
