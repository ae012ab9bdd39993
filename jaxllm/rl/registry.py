"""Named pieces of RL math, chosen by a config string.

A `Registry` maps names to functions of one kind: advantage estimators
(`rl.advantages.ADVANTAGE_ESTIMATORS`, `grpo.advantage_estimator`) and KL estimators
(`rl.kl.KL_ESTIMATORS`, `grpo.kl_estimator`). Each kind's built-ins are listed once, in
the module that defines them; a script adds its own before the stage starts
(`register_advantage_estimator(name, fn)`, as `register_reward` for rewards), and the
config's validation lists every registered name. A built-in cannot be replaced; a
name a script added can be (running the script again registers it again).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

Fn = TypeVar("Fn", bound=Callable)


class Registry(Generic[Fn]):
    """Name -> function for one kind of piece (`kind` names it in messages, `how` says how
    a script registers one)."""

    def __init__(self, kind: str, how: str, builtin: Mapping[str, Fn]):
        self.kind, self.how = kind, how
        self._builtin = dict(builtin)
        self._added: dict[str, Fn] = {}

    def register(self, name: str, fn: Fn) -> None:
        if name in self._builtin:
            raise ValueError(f"'{name}' is a built-in {self.kind}; choose another name")
        if not callable(fn):
            raise TypeError(f"the {self.kind} '{name}' must be a function, got {fn!r}")
        self._added[name] = fn

    def names(self) -> tuple[str, ...]:
        """Every registered name: the built-ins first, in their order, then those added."""
        return (*self._builtin, *self._added)

    def __contains__(self, name: object) -> bool:
        return name in self._builtin or name in self._added

    def __getitem__(self, name: str) -> Fn:
        if name in self._builtin:
            return self._builtin[name]
        if name in self._added:
            return self._added[name]
        raise ValueError(
            f"{self.kind} '{name}' is unknown; use {', '.join(self.names())} or {self.how}"
        )
