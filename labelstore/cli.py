"""The `labelstore` command line: a thin dispatcher.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their command runs, so `labelstore info` never imports transformers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from labelstore.errors import LabelStoreError

COMMANDS: dict[str, tuple[str, str]] = {
    "compile": ("labelstore.teacher.compile", "run a teacher over a corpus and write a label store"),
    "demo": ("labelstore.tools.demo", "build the embedded demo teacher (cached) and compile a store with it"),
    "info": ("labelstore.store.info", "summarise a store: samples, tokens, bytes per token, compression ratios"),
    "verify": ("labelstore.store.verify", "check every checksum, the schema and that every row decodes"),
    "bench": ("labelstore.tools.bench", "measure bytes per token against fidelity for every setting"),
    "export": ("labelstore.student.export", "write a store as plain Parquet columns (or DistillKit's layout)"),
    "import": ("labelstore.student.distillkit", "read a DistillKit capture directory into a new store"),
}


def _build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(
        prog="labelstore",
        description="Compile teacher soft labels into a compact, crash-safe Arrow store, and read them back.",
    )
    from labelstore import __version__

    parser.add_argument("--version", action="version", version=f"labelstore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only import the module of the command being run (cheap --help for the others).
    wanted = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (modname, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            module = importlib.import_module(modname)
            module.add_arguments(p)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = _build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None or module is None:
        parser.print_help()
        return 2
    try:
        return int(module.run(args) or 0)
    except LabelStoreError as exc:
        print(f"labelstore {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"labelstore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
