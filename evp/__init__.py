"""evp: a durable event queue with key-ordered, sharded processing.

The Python API for embedding evp without its command line (docs/api.md):

- `Producer`: an async publisher with batching, acknowledgements and reconnects.
- `Consumer`: an async member of a consumer group.
- `ClientError` and `ServerError`: failures talking to the queue.

They live in `evp.client` and are imported from there on first use, so that the
command line does not load them when it does not need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evp.context import Context, Keyed

__all__ = ["Context", "Keyed", "__version__"]

__version__ = "0.1.0"

__all__ = ["ClientError", "Consumer", "Producer", "ServerError", "__version__"]

if TYPE_CHECKING:
    from evp.client import ClientError, Consumer, Producer, ServerError


def __getattr__(name: str) -> Any:
    if name in ("ClientError", "Consumer", "Producer", "ServerError"):
        from evp import client

        return getattr(client, name)
    raise AttributeError(f"module 'evp' has no attribute {name!r}")
