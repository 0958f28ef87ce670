"""fast_init: a frozen dataclass built by its fast __init__ is the object the generated
__init__ builds, with the same signature, refusals and frozenness."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from dataclasses import dataclass, field

import pytest

from moe_router_client.frozen_init import fast_init


def _define(fast: bool, name: str) -> type:
    def make() -> list[int]:
        return [1]

    @dataclass(frozen=True)
    class Answer:
        seq: int
        name: str
        shape: tuple[int, ...] = (1, 2)
        tags: list[int] = field(default_factory=make)
        hidden: int = field(default=7, init=False)
        made: list[int] = field(default_factory=list, init=False)
        total: int = field(default=0, kw_only=True)
        scale: float = field(default=1.0, kw_only=True)
        doubled: int = field(default=0, init=False)

        def __post_init__(self) -> None:
            if self.seq < 0:
                raise ValueError("seq: must be >= 0")
            object.__setattr__(self, "doubled", 2 * self.seq)

    Answer.__qualname__ = Answer.__name__ = name  # a module-level name: picklable
    return fast_init(Answer) if fast else Answer


FastAnswer = FAST = _define(True, "FastAnswer")
GeneratedAnswer = GENERATED = _define(False, "GeneratedAnswer")


@pytest.mark.parametrize(("args", "kwargs"), [
    ((1, "a"), {}),
    ((2, "b", (3,)), {"total": 5}),
    ((3, "c"), {"tags": [9], "scale": 0.5, "shape": ()}),
])
def test_it_builds_the_generated_init_s_object(args: tuple, kwargs: dict) -> None:
    fast, generated = FAST(*args, **kwargs), GENERATED(*args, **kwargs)
    assert dataclasses.asdict(fast) == dataclasses.asdict(generated)
    assert repr(fast) == repr(generated).replace("GeneratedAnswer", "FastAnswer")
    assert vars(fast) == vars(generated)  # the same instance dict
    assert fast.doubled == 2 * args[0]  # __post_init__ ran
    assert fast == FAST(*args, **kwargs) and fast != FAST(99, "z")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.seq = 5
    assert dataclasses.replace(fast, name="r").name == "r"
    assert pickle.loads(pickle.dumps(fast)) == fast


def test_defaults_factories_and_refusals_behave_as_generated() -> None:
    first, second = FAST(1, "a"), FAST(1, "a")
    assert first.tags == [1] and first.tags is not second.tags  # a new one each
    assert first.made == [] and first.made is not second.made
    assert first.hidden == 7
    for build in (FAST, GENERATED):
        with pytest.raises(TypeError):
            build(1)  # name is required
        with pytest.raises(TypeError):
            build(1, "a", (1,), [1], 5)  # total is keyword-only
        with pytest.raises(TypeError):
            build(1, "a", hidden=3)  # not an __init__ field
        with pytest.raises(ValueError, match="seq: must be >= 0"):
            build(-1, "a")


def test_the_signature_is_the_generated_one() -> None:
    fast, generated = inspect.signature(FAST), inspect.signature(GENERATED)
    assert [(p.name, p.kind, p.annotation) for p in fast.parameters.values()] == [
        (p.name, p.kind, p.annotation) for p in generated.parameters.values()]
    defaults = {n: p.default for n, p in fast.parameters.items()}
    assert defaults["shape"] == (1, 2) and defaults["total"] == 0
    assert FAST.__init__.__qualname__ == "FastAnswer.__init__"


def test_classes_it_cannot_serve_are_refused() -> None:
    @dataclass
    class Plain:
        a: int

    @dataclass(frozen=True, slots=True)
    class Slotted:
        a: int

    @dataclass(frozen=True)
    class WithInitVar:
        a: int
        b: dataclasses.InitVar[int] = 0

    for cls, why in ((Plain, "frozen dataclasses"), (Slotted, "no slots"),
                     (WithInitVar, "InitVar"), (int, "frozen dataclasses")):
        with pytest.raises(TypeError, match=why):
            fast_init(cls)
