"""`loom` command line: parses the command and dispatches; the work lives in the modules it calls.

Every user mistake surfaces as a `ConfigError`, printed as one line on stderr with exit status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from framework.config.errors import ConfigError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is a ConfigError like any other user mistake."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(
            "command line", self.prog, " ".join(sys.argv[1:]), message, f"see `{self.prog} --help`"
        )


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path of the YAML recipe")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set model.n_layers=4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="loom", description="Loom: pretrain transformer language models from a YAML recipe."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser("train", help="train from a recipe")
    _add_recipe_args(train)
    train.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="continue from a checkpoint: 'auto' = the newest complete one in the run's checkpoint folder",
    )
    check = commands.add_parser(
        "check", help="validate a recipe; print it resolved, with size, FLOPs and memory"
    )
    _add_recipe_args(check)
    data = commands.add_parser("data", help="data tools")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    demo = data_commands.add_parser("demo", help="build the bundled demo corpus and tokenizer")
    demo.add_argument("--out", default="data/demo", help="output folder (default data/demo)")
    return parser


def run(argv: Sequence[str]) -> int:
    """Run one command; raises ConfigError for user mistakes (see `main`)."""
    args = build_parser().parse_args(list(argv))
    if args.command == "check":
        from launcher.check import check

        print(check(args.recipe, args.overrides))
        return 0
    if args.command == "train":
        from framework.config.loader import load_recipe
        from framework.run import train

        train(load_recipe(args.recipe, args.overrides), recipe_path=args.recipe, resume=args.resume)
        return 0
    if args.command == "data" and args.data_command == "demo":
        from framework.data.demo import build_demo_data

        build_demo_data(args.out)
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # argparse only lets known commands through


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: user mistakes become one line on stderr and exit status 2."""
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"loom: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("loom: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
