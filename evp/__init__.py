"""evp: a durable event queue with key-ordered, sharded processing."""

__version__ = "0.1.0"
