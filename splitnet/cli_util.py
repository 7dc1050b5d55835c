"""Pieces both command lines share: logging set-up and turning errors into one-line exits."""

from __future__ import annotations

import argparse
import logging
import os

from splitnet import wire


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else getattr(logging, os.environ.get("SPLIT_LOG_LEVEL", "INFO").upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads.

    Edge and cloud often share a machine (demo, tests, CI): two processes each running
    torch's default of one thread per core made a step 14x slower on 2 cores
    (783 ms vs 55 ms), so both CLIs default to 1 and take --threads to raise it.
    """
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    """The `--threads` flag every process of the project takes (see `set_threads`)."""
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default %(default)s; 0: torch's default of one per core)")


def port(text: str) -> int:
    """argparse type of a port to listen on: 0 (any free one) .. 65535; argparse names the flag."""
    if not text.isdigit() or int(text) > wire.MAX_PORT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port in 0..{wire.MAX_PORT}")
    return int(text)


def listen_address(text: str) -> str:
    """argparse type of a HOST:PORT to listen on (port 0: any free one)."""
    try:
        wire.parse_address(text, listen=True)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text
