"""One Registry class; METHODS, DATASETS, EVALUATORS and ATTACKS are its instances."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from bench.errors import unknown

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> plug-in class, filled by the `register` decorator when a plug-in module is imported."""

    def __init__(self, kind: str, modules: tuple[str, ...] = ()):
        self.kind = kind
        self._modules = modules
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return add

    def _load(self) -> None:
        # Plug-ins register themselves on import; importing lazily keeps `import bench` cheap.
        if not self._loaded:
            self._loaded = True
            import importlib

            for module in self._modules:
                importlib.import_module(module)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            raise unknown(self.kind, name, self._items)
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


METHODS: Registry = Registry("method", ("methods",))
DATASETS: Registry = Registry("dataset", ("bench.data",))
EVALUATORS: Registry = Registry("evaluator", ("evaluators",))
ATTACKS: Registry = Registry("attack", ("attacks",))  # bench/attack.py runs them on finished runs
