"""Command line: ``python -m maskrcnn_fast [selfcheck]``."""
from __future__ import annotations

import argparse
import sys


def selfcheck(args) -> int:
    """Run every kernel on small random inputs and compare with torchvision."""
    from maskrcnn_fast.selfcheck import run

    return run()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="maskrcnn-fast", description="The fastest readable Mask R-CNN.")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("selfcheck", help=selfcheck.__doc__).set_defaults(func=selfcheck)
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["selfcheck"])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
