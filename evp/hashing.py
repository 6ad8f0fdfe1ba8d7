"""The two hash mappings that every evp process must compute identically.

Key to partition
----------------
``partition_for(key, partitions)`` is ``xxh3_64(key) % partitions``, with XXH3 64-bit,
seed 0, over the key bytes exactly as published. This is a stable contract: the same key
maps to the same partition in every process, on every platform and in every evp
version, so per-key ordering survives restarts and upgrades. Changing it would re-route
every key, and the pinned values in tests/test_hashing.py fail if it changes.

XXH3-64 is used because it is fast on short keys and spreads them evenly over the
partitions, and because xxHash 0.8.0 froze its output: the same input gives the same value
on every platform and in every later release. Python's built-in ``hash()`` is salted per
process (PYTHONHASHSEED), so two processes would disagree. When ``partitions`` is a power
of two (the default is 64) the modulo has no bias, and for other counts the bias is below
``partitions / 2**64``.

Partition to member
-------------------
``assign(partitions, members, load_factor)`` spreads the partitions of a topic over the
members of a group with consistent hashing with bounded loads (Mirrokni, Thorup and
Zadimoghaddam, "Consistent Hashing with Bounded Loads"). Each member owns
``VNODES_PER_MEMBER`` points on a hash ring. Taking the partitions in a fixed order, each
goes to the first point clockwise from its own ring position whose member is below the
cap. For M members it guarantees that:

- every partition in ``range(partitions)`` is assigned to exactly one member;
- every member is a key of the result, possibly with an empty list, and lists are sorted;
- no member is assigned more than ``ceil(load_factor * partitions / M)`` partitions;
- the result depends only on ``partitions``, the set of member ids and ``load_factor``,
  never on the order of ``members``, the process or PYTHONHASHSEED.

The ring layout below is part of that contract: ``VNODES_PER_MEMBER``, the text hashed
for each member point, the evenly spaced partition positions and the placement order.
Changing any of them reassigns partitions.

When a member joins or leaves, the partitions that move are mostly those taken by the
new member or released by the leaving one. Because the cap changes with M, a few more
move between members that stay. This is measured, not guaranteed: tests/test_hashing.py
asserts bounds for 64 and 256 partitions when 8 members become 9 or 7.

The cap bounds only the maximum load. Each partition lands on a member with probability
close to 1/M, so loads below the mean vary like a binomial count. In 200 random sets of 8
members sharing 64 partitions (mean load 8), the least loaded member had 1 in the worst set.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable

import xxhash

RING_SIZE = 2**64  # ring positions are the full range of a 64-bit hash

# Points on the ring per member. A member's share of the ring has a relative standard
# deviation of about 1/sqrt(points), 9% at 128, which matters when each member has hundreds
# of partitions. With 64 or 256 partitions over 8 members, binomial noise in the partition
# counts dominates instead: 64, 128 and 256 points moved the same number of partitions on a
# join or leave, within noise, measured over 200 member sets.
VNODES_PER_MEMBER = 128


def key_hash(key: bytes) -> int:
    """Return the XXH3 64-bit hash (seed 0) of a key as an unsigned integer."""
    return xxhash.xxh3_64_intdigest(key)


def partition_for(key: bytes, partitions: int) -> int:
    """Return the partition of a key, ``key_hash(key) % partitions``.

    Raises ValueError if partitions < 1.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    return xxhash.xxh3_64_intdigest(key) % partitions


def assign(
    partitions: int, members: Iterable[str], load_factor: float = 1.25
) -> dict[str, list[int]]:
    """Assign each partition to one member by consistent hashing with bounded loads.

    No member gets more than ``ceil(load_factor * partitions / len(members))`` partitions.
    Returns {} for an empty member list. Raises TypeError if partitions is not an int, and
    ValueError if partitions < 1, load_factor is below 1.0 or not finite, or a member id is
    empty, not a string, not valid Unicode or repeated.
    """
    if not isinstance(partitions, int):
        raise TypeError(f"partitions must be an int, got {partitions!r}")
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    if not (math.isfinite(load_factor) and load_factor >= 1.0):
        raise ValueError(f"load_factor must be a finite number >= 1.0, got {load_factor}")
    member_ids = _check_members(members)
    if not member_ids:
        return {}

    cap = math.ceil(load_factor * partitions / len(member_ids))
    points, owners = _ring(member_ids)
    load = dict.fromkeys(member_ids, 0)
    result: dict[str, list[int]] = {member: [] for member in member_ids}

    # Partitions sit at evenly spaced ring positions. Hashed positions would cluster and
    # push members to the cap, and the overflow moved two to three times as many partitions
    # between staying members on a join or leave (measured with 256 partitions over 8
    # members). Partitions are placed in the order of a hash of their number. That order
    # never depends on membership, so the same partitions keep their priority.
    for partition in sorted(range(partitions), key=_placement_rank):
        position = partition * RING_SIZE // partitions
        index = bisect.bisect_left(points, position)
        # Walk clockwise past members at the cap. The walk ends because the members'
        # total capacity, M * cap, is at least load_factor * partitions >= partitions.
        while True:
            member = owners[index % len(owners)]
            if load[member] < cap:
                break
            index += 1
        load[member] += 1
        result[member].append(partition)

    for assigned in result.values():
        assigned.sort()
    return result


def moved(before: dict[str, list[int]], after: dict[str, list[int]]) -> set[int]:
    """Return the partitions whose owner differs between two assignments.

    A partition present in only one of them counts as moved.
    """
    owner_before = _owner_by_partition(before)
    owner_after = _owner_by_partition(after)
    return {
        partition
        for partition in owner_before.keys() | owner_after.keys()
        if owner_before.get(partition) != owner_after.get(partition)
    }


def _check_members(members: Iterable[str]) -> list[str]:
    """Check that member ids are unique non-empty strings and return them sorted."""
    if isinstance(members, (str, bytes)):
        # A bare string is an iterable of one-character ids, which is never intended.
        raise ValueError(f"members must be an iterable of member ids, got {members!r}")
    member_ids = list(members)
    seen: set[str] = set()
    for member in member_ids:
        if not isinstance(member, str) or not member:
            raise ValueError(f"member id must be a non-empty string, got {member!r}")
        try:
            member.encode()
        except UnicodeEncodeError:
            # Lone surrogates have no UTF-8 form, so the id could not be hashed.
            raise ValueError(f"member id {member!r} is not valid Unicode text") from None
        if member in seen:
            raise ValueError(f"member id {member!r} is repeated; member ids must be unique")
        seen.add(member)
    return sorted(member_ids)


def _ring(member_ids: list[str]) -> tuple[list[int], list[str]]:
    """Build the ring: sorted point positions and the member owning each point."""
    # The UTF-8 text "<member id>#<i>" names point i of a member. The decimal suffix never
    # contains "#", so distinct (member, i) pairs always give distinct texts.
    ring = sorted(
        (xxhash.xxh3_64_intdigest(f"{member}#{i}".encode()), member)
        for member in member_ids
        for i in range(VNODES_PER_MEMBER)
    )
    return [point for point, _ in ring], [member for _, member in ring]


def _placement_rank(partition: int) -> tuple[int, int]:
    return xxhash.xxh3_64_intdigest(f"partition#{partition}".encode()), partition


def _owner_by_partition(assignment: dict[str, list[int]]) -> dict[int, str]:
    owner: dict[int, str] = {}
    for member, assigned in assignment.items():
        for partition in assigned:
            if partition in owner:
                raise ValueError(
                    f"partition {partition} is assigned to both {owner[partition]!r} and "
                    f"{member!r}; an assignment must give each partition one owner"
                )
            owner[partition] = member
    return owner
