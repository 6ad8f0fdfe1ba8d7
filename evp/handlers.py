"""Loading `--handler` values and calling them in the shape their author wrote.

A handler is one of:

- a function taking `(event)` or `(event, context)`, sync or async;
- a class with `handle(event, context)` (or `handle(event)`), sync or async, and
  optional `setup()` and `teardown()`. A shard creates one instance, calls `setup()`
  before it joins its group and `teardown()` when it stops. `--handler-arg NAME=VALUE`
  options become keyword arguments of the constructor (values are strings);
- a built-in, `evp:NAME` (see evp.builtins).

The shape is read once, when the handler is loaded, not on every event.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evp.context import Context, ShardInfo

BUILTIN_MODULE = "evp"


class HandlerError(Exception):
    """The --handler value cannot be loaded or set up."""


def parse_handler_args(values: list[str] | None) -> dict[str, str]:
    """Parse `--handler-arg NAME=VALUE` options; raise HandlerError naming a bad one."""
    args: dict[str, str] = {}
    for value in values or []:
        name, separator, text = value.partition("=")
        name = name.strip()
        if not separator or not name.isidentifier():
            raise HandlerError(
                f"invalid --handler-arg {value!r}: expected NAME=VALUE with NAME a Python "
                f"identifier, e.g. path=results.jsonl"
            )
        if name in args:
            raise HandlerError(f"--handler-arg {name!r} is given twice; give it once")
        args[name] = text
    return args


def load_handler(spec: str) -> Any:
    """Import `MODULE:NAME` (or `path/to/file.py:NAME`, or `evp:BUILTIN`) and return it.

    Returns the function or class, not an instance, so the supervisor can check a
    value without running the handler's constructor.
    """
    module_name, separator, attribute = spec.partition(":")
    if not separator or not module_name or not attribute:
        raise HandlerError(
            f"invalid handler {spec!r}: expected MODULE:FUNCTION or MODULE:CLASS, "
            f"e.g. myapp.handlers:enrich"
        )
    if module_name == BUILTIN_MODULE:
        from evp.builtins import BUILTINS

        if attribute not in BUILTINS:
            names = ", ".join(f"evp:{name}" for name in sorted(BUILTINS))
            raise HandlerError(f"unknown built-in handler {spec!r}: use one of {names}")
        return BUILTINS[attribute]
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        if not path.is_file():
            raise HandlerError(f"handler file {module_name!r} not found")
        sys.path.insert(0, str(path.parent))
        module_name = path.stem
    elif "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerError(f"cannot import handler module {module_name!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any error while the user's module runs
        raise HandlerError(
            f"handler module {module_name!r} failed while importing: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    try:
        target = getattr(module, attribute)
    except AttributeError:
        raise HandlerError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(target):
        raise HandlerError(
            f"handler {spec!r} is a {type(target).__name__}, not a function or a class"
        )
    return target


def _takes_context(function: Callable[..., Any], spec: str, skip_self: bool = False) -> bool:
    """Return True when `function` takes (event, context), False for (event).

    Raises HandlerError for any other signature, naming the handler. `skip_self`
    ignores the first parameter, for a method looked up on its class.
    """
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return False  # a builtin or extension function: call it with the event alone
    positional = [
        parameter
        for parameter in signature.parameters.values()
        if parameter.kind
        in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if skip_self:
        positional = positional[1:]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    variadic = any(
        parameter.kind is inspect.Parameter.VAR_POSITIONAL
        for parameter in signature.parameters.values()
    )
    if len(required) > 2 or (not positional and not variadic):
        raise HandlerError(
            f"handler {spec!r} takes {len(required)} required arguments; a handler takes "
            f"(event) or (event, context)"
        )
    return len(positional) >= 2 or variadic


def _positional_count(function: Callable[..., Any]) -> int:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return 0
    return sum(
        1
        for parameter in parameters
        if parameter.kind
        in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.VAR_POSITIONAL,
        )
    )


def check_handler(spec: str, args: dict[str, str]) -> None:
    """Load `spec` and check its shape and `args` without creating an instance."""
    target = load_handler(spec)
    _shape(target, spec, args)


def _shape(target: Any, spec: str, args: dict[str, str]) -> None:
    if inspect.isclass(target):
        handle = getattr(target, "handle", None)
        if not callable(handle):
            raise HandlerError(
                f"handler class {spec!r} has no handle method; define "
                f"handle(self, event, context)"
            )
        try:
            inspect.signature(target).bind(**args)
        except TypeError as exc:
            raise HandlerError(
                f"handler class {spec!r} does not accept --handler-arg "
                f"{', '.join(sorted(args)) or '(none)'}: {exc}"
            ) from None
        except ValueError:
            pass  # no signature to check; the constructor reports a mismatch
        _takes_context(handle, spec, skip_self=True)
        return
    if args:
        raise HandlerError(
            f"handler {spec!r} is a function, and --handler-arg is only for handler "
            f"classes; drop --handler-arg {', '.join(sorted(args))} or use a class"
        )
    _takes_context(target, spec)


class Handler:
    """A loaded handler, ready to call once per event."""

    def __init__(self, spec: str, args: dict[str, str] | None = None) -> None:
        self.spec = spec
        args = args or {}
        target = load_handler(spec)
        _shape(target, spec, args)
        self.instance: Any = None
        if inspect.isclass(target):
            try:
                self.instance = target(**args)
            except Exception as exc:  # noqa: BLE001 - any error of the user's constructor
                raise HandlerError(
                    f"handler class {spec!r} failed while creating its instance: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            function = self.instance.handle
        else:
            function = target
        self.function: Callable[..., Any] = function
        self.takes_context = _takes_context(function, spec)
        self.is_async = inspect.iscoroutinefunction(function)

    async def setup(self, shard: ShardInfo) -> None:
        """Run the instance's `setup()`, raising HandlerError when it fails."""
        await self._hook("setup", shard)

    async def teardown(self, shard: ShardInfo) -> None:
        """Run the instance's `teardown()`, raising HandlerError when it fails."""
        await self._hook("teardown", shard)

    async def _hook(self, name: str, shard: ShardInfo) -> None:
        method = getattr(self.instance, name, None) if self.instance is not None else None
        if method is None:
            return
        try:
            # `setup(self)` or `setup(self, shard)`, sync or async.
            result = method(shard) if _positional_count(method) >= 1 else method()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # noqa: BLE001 - any error of the user's code
            raise HandlerError(
                f"{name}() of handler {self.spec!r} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def call(self, event: dict[str, Any], context: Context) -> Any:
        """Call the handler; the result may be awaitable."""
        if self.takes_context:
            return self.function(event, context)
        return self.function(event)
