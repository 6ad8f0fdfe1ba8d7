"""The per-event context passed to handlers, and the wrapper that sets an output key."""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Keyed:
    """A handler result published to `--output-topic` under `key` instead of the input's key."""

    key: str
    event: dict[str, Any]


class Context:
    """The origin of one event and its delivery count, for a handler's second argument.

    A handler that takes two parameters, `(event, context)`, gets one per call.
    """

    __slots__ = (
        "topic",
        "partition",
        "offset",
        "key",
        "shard",
        "member",
        "delivery",
        "timestamp_us",
        "logger",
    )

    def __init__(
        self,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: str,
        shard: int,
        member: str,
        delivery: int,
        timestamp_us: int,
        logger: logging.Logger,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        # The event's key, decoded from UTF-8 (the queue accepts no other keys).
        self.key = key
        # The index of the shard process, 0 to --shards - 1.
        self.shard = shard
        # The shard's member id in its group, `<node>/shard-<index>`.
        self.member = member
        # 1 on the first delivery; each retry and each crash of a shard on this event
        # adds one.
        self.delivery = delivery
        # Publish time in microseconds since the Unix epoch, set by the publisher's clock.
        self.timestamp_us = timestamp_us
        # A logger named for the shard, e.g. "evp.handler.shard-3".
        self.logger = logger

    @property
    def timestamp(self) -> datetime.datetime:
        """The publish time as an aware datetime in UTC."""
        return datetime.datetime.fromtimestamp(self.timestamp_us / 1e6, datetime.UTC)

    def __repr__(self) -> str:
        return (
            f"Context(topic={self.topic!r}, partition={self.partition}, offset={self.offset}, "
            f"key={self.key!r}, shard={self.shard}, member={self.member!r}, "
            f"delivery={self.delivery})"
        )

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as JSON-ready values (the timestamp in ISO 8601)."""
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key,
            "shard": self.shard,
            "member": self.member,
            "delivery": self.delivery,
            "timestamp": self.timestamp.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """The shard a handler instance runs in, passed to `setup(shard)` and `teardown(shard)`
    of a handler class whose methods take one argument."""

    index: int
    member: str
    topic: str
    group: str
    logger: logging.Logger
