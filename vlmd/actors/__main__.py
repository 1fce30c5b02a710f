"""Entry point of every actor process: `python -m vlmd.actors ROLE RUN_DIR [RANK]`."""

from __future__ import annotations

import logging
import signal
import sys

import uvloop

from vlmd.actors.launch import die_with_parent, read_launch, setup_logging
from vlmd.ipc import ChannelClosed


def main() -> None:
    role, run_dir = sys.argv[1], sys.argv[2]
    rank = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    die_with_parent()
    # Ctrl-C reaches the whole process group; the supervisor alone decides what it means (a drain,
    # then SIGTERM to every actor), so a first Ctrl-C must not kill the actors under a drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(f"{role}{rank}" if role in ("worker", "preprocess") or rank else role)
    launch = read_launch(run_dir)
    if role == "scheduler":
        from vlmd.actors.scheduler import run
    elif role == "worker":
        from vlmd.actors.worker import run
    elif role == "vision":
        from vlmd.actors.vision import run
    elif role == "http":
        from vlmd.actors.http import run
    elif role == "preprocess":
        from vlmd.actors.preprocess import run
    else:
        raise SystemExit(f"unknown actor role {role!r}")
    try:
        uvloop.run(run(launch, rank))
    except ChannelClosed as exc:
        # A peer died or the server is stopping: the supervisor knows and reports it.
        logging.getLogger("vlmd").info("a peer connection closed (%s): exiting", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
