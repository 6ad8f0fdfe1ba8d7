"""The generated events of `evp publish`: valid, varied and keyed by user."""

from __future__ import annotations

import re
from collections import Counter

import orjson

from evp.events import ACTIONS, PAGES, EventGenerator

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def test_events_are_json_objects_keyed_by_user():
    generator = EventGenerator(keys=50, seed=1)
    for number in range(1, 2001):
        key, value = generator.next()
        event = orjson.loads(value)
        assert type(event) is dict
        assert event["user"].encode() == key
        assert event["seq"] == number
        assert UUID4.fullmatch(event["id"]), event["id"]
        assert event["type"] in ACTIONS
        assert event["data"]["page"] in PAGES
        assert 10 <= event["data"]["duration_ms"] < 5000
        assert 0 <= event["data"]["amount"] < 100
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", event["time"])
        assert 150 <= len(value) <= 230


def test_ids_unique_and_keys_spread():
    first, second = EventGenerator(keys=100, seed=1), EventGenerator(keys=100, seed=2)
    pairs = [first.next() for _ in range(20_000)] + [second.next() for _ in range(20_000)]
    ids = {orjson.loads(value)["id"] for _, value in pairs}
    assert len(ids) == len(pairs)
    per_key = Counter(key for key, _ in pairs)
    assert len(per_key) == 100
    # 400 events per key on average; a fair draw stays well inside these bounds.
    assert min(per_key.values()) > 250
    assert max(per_key.values()) < 550
    decoded = [orjson.loads(value) for _, value in pairs]
    kinds = Counter((event["type"], event["data"]["page"]) for event in decoded)
    assert len(kinds) == len(ACTIONS) * len(PAGES)


def test_seed_repeats_the_sequence():
    def run(seed: int) -> list[tuple[bytes, dict]]:
        generator = EventGenerator(keys=10, seed=seed)
        out = []
        for _ in range(100):
            key, value = generator.next()
            event = orjson.loads(value)
            del event["time"]
            out.append((key, event))
        return out

    assert run(7) == run(7)
    assert run(7) != run(8)
