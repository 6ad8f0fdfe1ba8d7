"""Loading --handler values: shapes read from signatures, classes, built-ins and errors."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from pathlib import Path

import pytest

from evp.context import Context, ShardInfo
from evp.handlers import Handler, HandlerError, check_handler, parse_handler_args

SOURCE = textwrap.dedent(
    """
    def one(event):
        return {"got": event}

    def two(event, context):
        return {"got": event, "key": context.key}

    async def two_async(event, context):
        return {"got": event, "delivery": context.delivery}

    def none():
        return None

    def three(event, context, extra):
        return None

    class Plain:
        def handle(self, event):
            return event

    class Configured:
        def __init__(self, path, mode="a"):
            self.path = path
            self.mode = mode
            self.calls = []

        def setup(self, shard):
            self.calls.append(("setup", shard.index))

        def handle(self, event, context):
            return {"path": self.path, "mode": self.mode}

        async def teardown(self):
            self.calls.append(("teardown",))

    class NoHandle:
        pass

    class FailingInit:
        def __init__(self):
            raise RuntimeError("no settings")

        def handle(self, event):
            return event
    """
)


@pytest.fixture
def module(tmp_path: Path) -> Path:
    path = tmp_path / "shapes_module.py"
    path.write_text(SOURCE)
    return path


def context(key: str = "k") -> Context:
    return Context(
        topic="events", partition=1, offset=2, key=key, shard=0, member="n/shard-0",
        delivery=3, timestamp_us=1_700_000_000_000_000, logger=logging.getLogger("t"),
    )


def shard_info() -> ShardInfo:
    return ShardInfo(index=4, member="n/shard-4", topic="events", group="g", logger=logging.getLogger("t"))


def test_function_of_event(module):
    handler = Handler(f"{module}:one")
    assert not handler.takes_context
    assert handler.call({"a": 1}, context()) == {"got": {"a": 1}}


def test_function_of_event_and_context(module):
    handler = Handler(f"{module}:two")
    assert handler.takes_context
    assert handler.call({"a": 1}, context("user-1")) == {"got": {"a": 1}, "key": "user-1"}


def test_async_function_detected(module):
    handler = Handler(f"{module}:two_async")
    assert handler.is_async
    assert asyncio.run(handler.call({}, context())) == {"got": {}, "delivery": 3}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("none", "takes 0 required arguments; a handler takes (event) or (event, context)"),
        ("three", "takes 3 required arguments"),
        ("NoHandle", "has no handle method"),
    ],
)
def test_wrong_shape_rejected(module, name, message):
    with pytest.raises(HandlerError) as info:
        check_handler(f"{module}:{name}", {})
    assert message in str(info.value)


def test_class_with_event_only(module):
    handler = Handler(f"{module}:Plain")
    assert not handler.takes_context
    assert handler.call({"a": 1}, context()) == {"a": 1}


def test_class_arguments_and_hooks(module):
    handler = Handler(f"{module}:Configured", {"path": "out.jsonl"})
    assert handler.takes_context
    assert handler.call({}, context()) == {"path": "out.jsonl", "mode": "a"}
    asyncio.run(handler.setup(shard_info()))
    asyncio.run(handler.teardown(shard_info()))
    assert handler.instance.calls == [("setup", 4), ("teardown",)]


def test_class_arguments_checked(module):
    with pytest.raises(HandlerError) as info:
        check_handler(f"{module}:Configured", {"colour": "red"})
    assert "does not accept --handler-arg colour" in str(info.value)
    with pytest.raises(HandlerError) as info:
        check_handler(f"{module}:Configured", {})
    assert "missing a required argument: 'path'" in str(info.value)


def test_constructor_failure_named(module):
    with pytest.raises(HandlerError) as info:
        Handler(f"{module}:FailingInit")
    assert "failed while creating its instance: RuntimeError: no settings" in str(info.value)


def test_builtins_load():
    for name in ("passthrough", "print", "count", "jsonl"):
        check_handler(f"evp:{name}", {})
    assert Handler("evp:passthrough").call({"a": 1}, context()) == {"a": 1}


def test_count_interval_invalid():
    with pytest.raises(HandlerError) as info:
        Handler("evp:count", {"interval": "soon"})
    assert "invalid interval 'soon'" in str(info.value)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], {}),
        (["path=a=b.jsonl"], {"path": "a=b.jsonl"}),
        (["path=", "interval=5"], {"path": "", "interval": "5"}),
    ],
)
def test_handler_args_parsed(values, expected):
    assert parse_handler_args(values) == expected


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["path"], "invalid --handler-arg 'path': expected NAME=VALUE"),
        (["2x=1"], "invalid --handler-arg '2x=1'"),
        (["path=a", "path=b"], "--handler-arg 'path' is given twice"),
    ],
)
def test_handler_args_invalid(values, message):
    with pytest.raises(HandlerError) as info:
        parse_handler_args(values)
    assert message in str(info.value)
