"""Name -> attack class registry. Adding an attack is one file and one ``@register_attack``."""

from __future__ import annotations

from collections.abc import Callable

from user_errors import UserError

ATTACKS: dict[str, type] = {}


def register_attack(name: str) -> Callable[[type], type]:
    def decorate(cls: type) -> type:
        if name in ATTACKS:
            raise RuntimeError(f"attack {name!r} registered twice")
        cls.name = name
        ATTACKS[name] = cls
        return cls

    return decorate


def check_attack_name(name: str) -> str:
    if name not in ATTACKS:
        raise UserError(f"unknown attack {name!r}; valid attacks: {', '.join(ATTACKS)}")
    return name


def build_attack(name: str, **options):
    """Build an attack from its name; each attack takes the options it knows and ignores the rest."""
    cls = ATTACKS[check_attack_name(name)]
    return cls.from_options(**options)
