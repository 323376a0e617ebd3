"""The part of stepserve that knows about tensors.

``scheduler`` decides what runs each step (pure Python, no torch), ``runner`` executes the
plans on its own thread, ``models`` adapts diffusers pipelines to encode / denoise-step /
decode / preview functions. Nothing here imports the generated protobuf modules.
"""
