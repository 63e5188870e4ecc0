"""Continuous-batching generation engine.

Modules:

* ``sequence``: ``Sequence`` (one prompt being completed), the events it sends its sink
  (``TextDelta``, ``Finished``, ``Failed``) and the ``EngineObserver`` protocol;
* ``batches``: the ``Batch`` protocol and its two kinds, ``DynamicBatch`` (transformers forward,
  growable left-padded cache) and ``StaticBatch`` (``metalserve.staticdecode``: static cache,
  CUDA graphs on CUDA); ``generate_once`` (warm-up, outside the engine);
* ``loop``: ``Engine``, the thread with admission, model swaps, liveness and failure handling.

Threading: one thread (the engine's) owns the model and every batch; API threads only create
sequences, ``submit`` them, ``cancel`` them and ask for ``swap``s, under the engine's lock. Events
go to the sinks as they happen, on the engine thread; ``flush_events`` runs after every iteration,
so a sink may batch them.
"""

from metalserve.engine.batches import (
    WARMUP_PROMPT,
    WARMUP_TOKENS,
    Batch,
    DynamicBatch,
    StaticBatch,
    generate_once,
    warmup_prompt,
)
from metalserve.engine.loop import (
    DECODE_MODES,
    IDLE_WAIT_SECONDS,
    MAX_CONSECUTIVE_FAILURES,
    Engine,
    QueueFullError,
    StaleModelError,
)
from metalserve.engine.sequence import (
    EngineObserver,
    Event,
    Failed,
    Finished,
    Sequence,
    TextDelta,
)

__all__ = [
    "DECODE_MODES",
    "IDLE_WAIT_SECONDS",
    "MAX_CONSECUTIVE_FAILURES",
    "WARMUP_PROMPT",
    "WARMUP_TOKENS",
    "Batch",
    "DynamicBatch",
    "Engine",
    "EngineObserver",
    "Event",
    "Failed",
    "Finished",
    "QueueFullError",
    "Sequence",
    "StaleModelError",
    "StaticBatch",
    "TextDelta",
    "generate_once",
    "warmup_prompt",
]
