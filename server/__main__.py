"""``stepserve serve``: run the gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .config import ConfigError, ServerConfig, add_arguments, from_args
from .logging_setup import setup_logging

logger = logging.getLogger("stepserve")


async def serve(config: ServerConfig) -> int:
    from .app import StepServer

    server = StepServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    load = asyncio.create_task(server.load())
    failed = asyncio.create_task(server.failed.wait())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({load, stopping, failed}, return_when=asyncio.FIRST_COMPLETED)
    if load.done() and load.exception() is not None:
        logger.error("start-up failed: %s", load.exception())
        await server.stop(0)
        return 1
    await asyncio.wait({stopping, failed}, return_when=asyncio.FIRST_COMPLETED)
    if failed.done():
        await server.stop(0)
        return 1
    logger.info("signal received: draining (up to %.0fs)", config.drain_timeout_s)
    load.cancel()
    await server.stop()
    logger.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stepserve", description="stepserve: diffusion image generation over gRPC"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the gRPC server")
    add_arguments(serve_p)
    args = parser.parse_args(argv)
    try:
        config = from_args(args)
    except ConfigError as e:
        parser.error(str(e))
    setup_logging(config.log_format, config.log_level)
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
