"""Credentials that never print: a `Secret` shows as `Secret(****)` in reprs, logs and tracebacks, and its
value is read only where it is used (`reveal()`), so passing it through configs of actors cannot leak it."""

from __future__ import annotations

import os
import secrets


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not value:
            raise ValueError("a Secret needs a non-empty value")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(****)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)

    def __getstate__(self) -> str:  # actors receive it pickled, in the object store only
        return self._value

    def __setstate__(self, value: str) -> None:
        self._value = value


def secret_from_env(name: str, *, generate: bool = False) -> Secret | None:
    """The value of environment variable `name` as a Secret; if unset or empty, a fresh random one when
    `generate` (a key that lives as long as the run), else None."""
    value = os.environ.get(name, "")
    if value:
        return Secret(value)
    return Secret(secrets.token_urlsafe(32)) if generate else None
