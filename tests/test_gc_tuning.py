"""The collector's tuning (waitroom.core.runtime.tune_gc): young collections walk a few
thousand objects at most (each stops the event loop while it runs: with 50,000 a cluster
node stopped for up to 0.35 s), and the middle generation is left alone for a sale's worth
of survivors."""

from __future__ import annotations

import gc
import time
from typing import Any

from waitroom.core.runtime import GC_THRESHOLDS, tune_gc


def test_young_collections_are_short_and_the_older_generations_wait() -> None:
    saved = gc.get_threshold()
    runs: list[tuple[int, int, float]] = []
    started = [0.0]

    def note(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            runs.append((int(info["generation"]), gc.get_count()[0], 0.0))
        else:
            generation, young, _ = runs[-1]
            runs[-1] = (generation, young, time.perf_counter() - started[0])

    tune_gc()
    gc.callbacks.append(note)
    try:
        kept = [[i] for i in range(1_000_000)]  # a million survivors, as a sale's heap grows
        del kept
    finally:
        gc.callbacks.remove(note)
        gc.unfreeze()
        gc.set_threshold(*saved)
    generations = [g for g, _, _ in runs]
    # Young collections all along (about one per GC_THRESHOLDS[0] new objects)...
    assert generations.count(0) >= 1_000_000 // GC_THRESHOLDS[0] // 2, len(runs)
    # ... each walking a few thousand objects at most (a pause of milliseconds),
    assert max(young for _, young, _ in runs) <= 10_000, runs[:5]
    # ... and no middle or full collection for a million of them.
    assert set(generations) == {0}, sorted(set(generations))
