"""Command line: one module per command (`add_arguments` and `run`), each a few calls into an entry point.

Every user error (LMCompressError) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
from collections.abc import Iterator

# command -> module of this package; the order is the order of `lmcompress --help`
COMMANDS = ("finetune", "compress", "evaluate", "export", "distill", "demo", "methods", "sweep", "auto", "anatomy")


def _command(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    from lmcompress import __version__

    parser = argparse.ArgumentParser(prog="lmcompress", description="Fine-tune, then compress, transformer models "
                                     "using what each layer sees on the task's own data.")
    parser.add_argument("--version", action="version", version=f"lmcompress {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-layer log lines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = _command(name)
        command = sub.add_parser(name, help=module.HELP)
        module.add_arguments(command)
        # -q after the subcommand too; SUPPRESS keeps one given before it
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="no progress bars or per-layer log lines")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that cleanup (temporary output directories) runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into `Terminated` for the duration (not where they are ignored, as under nohup)."""
    def handler(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is None or signal.getsignal(number) == signal.SIG_IGN:
            continue
        with contextlib.suppress(ValueError):  # only the main thread may set handlers; elsewhere leave them
            previous[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for reports that say how they were made
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    import transformers

    transformers.logging.set_verbosity_error()  # their warnings about new heads are expected here
    transformers.utils.logging.disable_progress_bar()  # ours say what is happening; theirs clutter errors
    logging.getLogger("huggingface_hub").setLevel(logging.CRITICAL)  # offline retries: we report one line
    from pydantic import ValidationError

    from lmcompress.cli.common import check_at_least
    from lmcompress.errors import LMCompressError, validation_message

    module = _command(args.command)
    try:
        with signals_raise():
            check_at_least(args, getattr(module, "AT_LEAST", {}))
            module.run(args)
    except LMCompressError as err:
        print(f"lmcompress {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ValidationError as err:  # option values checked by a config model (e.g. --lr -1)
        print(f"lmcompress {args.command}: error: {validation_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        if isinstance(err, Terminated):
            print(f"lmcompress {args.command}: terminated by signal {err.signum}", file=sys.stderr)
            return 128 + err.signum
        print(f"lmcompress {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
