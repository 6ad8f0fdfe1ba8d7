"""evp: a durable event queue with key-ordered, sharded processing."""

from evp.context import Context, Keyed

__all__ = ["Context", "Keyed", "__version__"]

__version__ = "0.1.0"
