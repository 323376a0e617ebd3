"""The part of stepserve that knows about tensors.

``engine.Engine`` is the public face (thread-safe submit / cancel / drain / stop) and the
loop; ``scheduler`` decides what runs each step (pure Python, no torch); ``runner`` executes
a plan's model work under ``fault_policy``; ``completions``, ``ledger`` and ``outbox`` turn
the accelerator's results into charges and events in order; ``inbox`` is all the engine
thread shares with the API's threads; ``models`` adapts diffusers pipelines to encode /
denoise-step / decode / preview functions. Nothing here imports the API, gRPC or the
generated protobuf modules (``tests/test_import_walls.py``).
"""
