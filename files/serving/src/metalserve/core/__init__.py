"""The engine in a process of its own (``serve --engine-process``), as vLLM V1's engine core.

The API process keeps HTTP, the prompts' tokenization, the responses and the replica's state;
the engine's process (``process``) loads the versions (``metalserve.host.ModelHost``) and runs
the engine. So the engine thread's Python (each step's launches, sampling, detokenizing) and the
HTTP event loop's (parsing, validating, tokenizing, framing events) no longer take turns at one
interpreter lock.

Between them, one socket pair (``messages``): the API sends sequences, cancellations and calls
(start, load, swap, abort, wedge, profile, stop); the engine's process sends, once per engine
iteration, the events of every sequence and what its observer saw (the API's metrics count
them), its heartbeat several times a second, and the calls' answers. ``client`` is the API's
side: ``CoreClient`` stands where ``ModelHost`` does, ``RemoteEngine`` where ``Engine`` does.
"""
