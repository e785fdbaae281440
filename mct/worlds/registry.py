"""params.yaml's world ``kind`` -> its :class:`~mct.worlds.base.World` class: the one place a kind is named.

The built-in worlds register below; a new world registers itself where it is defined::

    @register("sphere")
    class Sphere(World): ...

and is then valid in params.yaml (``kind: sphere``) and runs through every stage. Torch-free: params validation
and the stage table look classes up here while Snakemake parses the workflow.
"""

from __future__ import annotations

from collections.abc import Callable

from mct.config import WorldConfig
from mct.worlds.base import World
from mct.worlds.digits import Digits
from mct.worlds.imagenet import ImageNet
from mct.worlds.text2image import Text2Image
from mct.worlds.toy2d import Toy2D

WORLDS: dict[str, type[World]] = {}


def register(kind: str) -> Callable[[type[World]], type[World]]:
    """Class decorator: params.yaml's ``kind: <kind>`` builds this class. A kind names one class: registering it
    again for another class is refused (a typo would otherwise replace a world silently)."""
    def add(cls: type[World]) -> type[World]:
        if not (isinstance(cls, type) and issubclass(cls, World)):
            raise TypeError(f"register({kind!r}): {cls!r} is not a World subclass")
        if WORLDS.get(kind, cls) is not cls:
            raise ValueError(f"world kind {kind!r} is already registered to {WORLDS[kind].__qualname__}")
        cls.kind = kind
        WORLDS[kind] = cls
        return cls
    return add


def unregister(kind: str) -> None:
    """Forget a kind (tests that register a world of their own clean up with this)."""
    WORLDS.pop(kind, None)


def world_class(kind: str) -> type[World]:
    if kind not in WORLDS:
        raise ValueError(f"unknown world kind {kind!r}; registered: {sorted(WORLDS)}")
    return WORLDS[kind]


def make_world(name: str, cfg: WorldConfig) -> World:
    """The world ``name`` of params.yaml, built from its config."""
    return world_class(cfg.kind)(name, cfg)


register("toy2d")(Toy2D)
register("digits")(Digits)
register("imagenet")(ImageNet)
register("text2image")(Text2Image)

__all__ = ["WORLDS", "World", "make_world", "register", "unregister", "world_class"]
