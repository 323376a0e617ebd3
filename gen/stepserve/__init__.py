"""stepserve: a gRPC diffusion image generation service.

The import package gathers three folders of the repository: ``stepserve.server``
(``server/``), ``stepserve.client`` (``client/``) and the generated protobuf stubs
``stepserve.v1`` (``gen/stepserve/v1``, made by ``make proto``).
"""

__version__ = "0.1.0"
