"""Short garbage-collector pauses for the long-running roles.

CPython's full collection walks every container object that survived the younger
generations, and the event loop waits meanwhile. A role that has just started has
about 20,000 to 30,000 of them (imported modules, the CLI, opened logs), which live
as long as the process. ``freeze_startup_objects`` moves them to the permanent
generation, which collections skip. The queue's log keeps its other long-lived
objects out of the collector's reach too (see ``PartitionLog._add_to_tail``).
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Collect once, then leave every object alive now out of later collections.

    Call it when start-up is done and before the steady state begins. Objects made
    later are collected as before. A frozen object that is dropped later is still
    freed by reference counting, unless it is part of a reference cycle, which then
    stays in memory: so call it when what is alive lives as long as the process.
    """
    gc.collect()
    gc.freeze()
