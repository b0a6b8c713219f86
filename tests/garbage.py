"""The cyclic garbage collector, made cheap to call in tests that count bytes."""

from __future__ import annotations

import gc


def collect_garbage() -> None:
    """Free the cyclic garbage of earlier tests, then freeze what survived (`gc.freeze`).

    Tests that count activation bytes collect first, so that no earlier graph dies inside
    their count. A full collection walks every live object: the suite's imports (numpy,
    torch, transformers) and the caches earlier tests filled, about a million objects, 0.4 to
    0.8 s a call. Frozen objects are skipped by later collections (and never freed, which a
    test session does not need), so each call walks only what was made since the last."""
    gc.collect()
    gc.freeze()
