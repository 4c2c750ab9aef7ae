"""`python -m pipeline.fake_claude --port 8787 --latency-ms 5000 ...`: run the fake until killed."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import msgspec

from .config import FakeClaudeConfig
from .runner import run_forever


def config_from_args(argv: Sequence[str] | None = None) -> FakeClaudeConfig:
    """Flags map one to one onto `FakeClaudeConfig` fields (dashes for underscores)."""
    p = argparse.ArgumentParser(prog="python -m pipeline.fake_claude", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8787, help="0 picks a free port")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--latency-sigma", type=float, default=0.0)
    p.add_argument("--latency-cap-ms", type=float, default=120_000.0)
    p.add_argument("--rpm", type=int)
    p.add_argument("--itpm", type=int)
    p.add_argument("--otpm", type=int)
    p.add_argument("--overloaded-rate", type=float, default=0.0, help="share of 529s")
    p.add_argument("--server-error-rate", type=float, default=0.0, help="share of 500s")
    p.add_argument(
        "--stream-error-rate",
        type=float,
        default=0.0,
        help="share of streams ended halfway by an overloaded error event",
    )
    p.add_argument(
        "--stream-cut-rate",
        type=float,
        default=0.0,
        help="share of streams whose connection is closed halfway",
    )
    p.add_argument(
        "--record-requests",
        type=int,
        default=0,
        help="keep the last N request bodies for GET /_fake/requests",
    )
    p.add_argument(
        "--batch-processing-s",
        type=float,
        default=2.0,
        help="seconds from a message batch's creation to its end",
    )
    p.add_argument(
        "--batch-error-rate", type=float, default=0.0, help="share of batch requests errored"
    )
    p.add_argument(
        "--batch-expire-rate", type=float, default=0.0, help="share of batch requests expired"
    )
    p.add_argument("--bad-key", action="append", default=[], dest="bad_keys")
    p.add_argument("--forbidden-key", action="append", default=[], dest="forbidden_keys")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-uvloop", action="store_true", help="plain asyncio event loop")
    p.add_argument("--config-json", help="extra fields as a JSON object, applied last")
    args = vars(p.parse_args(argv))
    args.pop("no_uvloop")
    extra = json.loads(args.pop("config_json") or "{}")
    return msgspec.convert({**args, **extra}, FakeClaudeConfig)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_forever(config_from_args(argv), use_uvloop="--no-uvloop" not in argv)


if __name__ == "__main__":
    main()
