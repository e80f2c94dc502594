"""Process-wide runtime tuning applied at the process edge (server, workers, benchmarks)."""

from __future__ import annotations

import gc


def tune_gc() -> None:
    """Run the cyclic garbage collector less often.

    A busy server allocates a future, a command and a result per request; with the default
    gen-0 threshold of 700 the collector runs thousands of times a second and each pass walks
    every young object. Our objects rarely form cycles, so collecting 50x less often costs a
    little memory and buys back a measurable share of CPU (about 13% on the reserve
    benchmark). Objects alive at start-up are frozen out of future collections.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
