"""`loom` command line: parses the command and dispatches; the work lives in the modules it calls.

Every user mistake surfaces as a `ConfigError`, printed as one line on stderr with exit status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from framework.config.errors import ConfigError
from launcher.local import Nodes

EXIT_USER_ERROR = 2
MULTI_NODE_FLAGS = {"nnodes": "--nnodes", "node_rank": "--node-rank", "master": "--master"}
_NODES_FIX = "give --nnodes M --node-rank R --master ADDR:PORT together (see docs/launch.md)"


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


def _add_input_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="text or JSONL files (.gz/.zst too) or folders of them")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default text)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        help="share of documents held out for validation, chosen by a hash of the text (default 0.01)",
    )


def _add_tokenizer_parser(data_commands: argparse._SubParsersAction) -> None:
    tok = data_commands.add_parser(
        "tokenizer", help="train a tokenizer on text/JSONL/Parquet: sentencepiece, or an HF byte-level BPE"
    )
    _add_input_args(tok)
    tok.add_argument(
        "--type", choices=["sentencepiece", "bpe"], default="sentencepiece", dest="tokenizer_type",
        help="sentencepiece: a .model file (default); bpe: a byte-level BPE tokenizer.json folder (HF tokenizers)",
    )  # fmt: skip
    tok.add_argument(
        "--out", required=True, help="the .model file to write (sentencepiece) or the new folder (--type bpe)"
    )
    tok.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    tok.add_argument("--vocab-size", type=int, default=32000, help="pieces in the model (default 32000)")
    tok.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="default bpe")
    tok.add_argument("--sentinels", type=int, default=32, help="T5 sentinels <extra_id_N> (default 32)")
    tok.add_argument(
        "--no-byte-fallback", action="store_true", help="unknown characters become <unk> instead of bytes"
    )
    tok.add_argument("--threads", type=int, default=2, help="trainer threads (part of reproducibility)")
    tok.add_argument(
        "--sample-sentences", type=int, default=0, help="train on this many sampled lines (0 = all)"
    )


def _add_prepare_parser(data_commands: argparse._SubParsersAction) -> None:
    prep = data_commands.add_parser(
        "prepare", help="tokenize and pack text/JSONL/Parquet/Arrow into webdataset shards"
    )
    _add_input_args(prep)
    prep.add_argument("--out", required=True, help="output folder of the prepared dataset (new or empty)")
    prep.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder whole")
    prep.add_argument(
        "--tokenizer", required=True, help="sentencepiece .model, an HF tokenizer.json, or an HF model folder"
    )
    prep.add_argument("--seq-len", type=int, required=True, help="the recipe's data.seq_len (or a multiple)")
    prep.add_argument("--shard-samples", type=int, default=8192, help="samples per shard (default 8192)")
    prep.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_data(args: argparse.Namespace) -> None:
    if args.data_command == "demo":
        from framework.data.demo import build_demo_data

        build_demo_data(args.out, overwrite=args.overwrite)
        return
    if args.data_command == "show":
        from framework.config.loader import load_recipe
        from framework.data.show import parse_range, show_samples

        start, end = parse_range(args.sample_range)
        print(show_samples(load_recipe(args.recipe, args.overrides), start, end))
        return
    _check_data_args(args)
    if args.data_command == "tokenizer" and args.tokenizer_type == "bpe":
        from framework.data.hf_tokenizer import train_bpe_on_files

        tokenizer = train_bpe_on_files(args.inputs, args.out, args.vocab_size, text_field=args.text_field,
                                       val_fraction=args.val_fraction, num_sentinels=args.sentinels,
                                       overwrite=args.overwrite)  # fmt: skip
        print(f"wrote {tokenizer.path} ({tokenizer.vocab_size} tokens, sha256 {tokenizer.sha256})")
        return
    if args.data_command == "tokenizer":
        from framework.data.tokenizer import train_tokenizer_on_files

        tokenizer = train_tokenizer_on_files(
            args.inputs,
            args.out,
            args.vocab_size,
            text_field=args.text_field,
            val_fraction=args.val_fraction,
            model_type=args.model_type,
            num_sentinels=args.sentinels,
            byte_fallback=not args.no_byte_fallback,
            num_threads=args.threads,
            input_sentence_size=args.sample_sentences,
            overwrite=args.overwrite,
        )
        print(f"wrote {tokenizer.path} ({tokenizer.vocab_size} pieces, sha256 {tokenizer.sha256})")
        return
    _run_prepare(args)


def _run_prepare(args: argparse.Namespace) -> None:
    from framework.data.prepare import prepare

    manifest = prepare(
        args.inputs,
        args.out,
        args.tokenizer,
        args.seq_len,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        shard_samples=args.shard_samples,
        workers=args.workers,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['documents']} documents, {split['tokens']} tokens, {split['samples']} samples")


def _check_data_args(args: argparse.Namespace) -> None:
    """Numbers argparse cannot range-check, as one-line user errors."""
    if not 0.0 <= args.val_fraction < 1.0:
        raise ConfigError(
            "command line", "--val-fraction", args.val_fraction, "must be in [0, 1)", "e.g. 0.01"
        )
    for name in ("vocab_size", "seq_len", "shard_samples", "threads"):
        value = getattr(args, name, 1)
        if value < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError("command line", flag, value, "must be >= 1", "use a positive number")
    for name in ("workers", "sentinels", "sample_sentences"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            flag = "--" + name.replace("_", "-")
            raise ConfigError("command line", flag, value, "must be >= 0", "use 0 or a positive number")


def _add_launch_args(train: argparse.ArgumentParser) -> None:
    train.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="worker processes on this machine (torchrun; gloo on CPU, NCCL on GPU); default: this process",
    )
    nodes = train.add_argument_group(
        "several machines without a scheduler (all three, with --nproc; see docs/launch.md)"
    )
    nodes.add_argument("--nnodes", type=int, metavar="M", help="machines in the run (the same on every node)")
    nodes.add_argument("--node-rank", type=int, metavar="R", help="this machine's index, 0 .. M-1")
    nodes.add_argument(
        "--master",
        metavar="ADDR:PORT",
        help="node 0's address and a free port there (the same on every node)",
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
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in a run directory that holds one: the old one is moved aside whole to "
        "<run_dir>.old-N (kept)",
    )
    train.add_argument(
        "--accept-data-change",
        action="store_true",
        help="resume although data.train/weights/seq_len/seed, train.seed or global_batch_size changed "
        "(refused otherwise: the data that comes next would change; docs/checkpoints.md)",
    )
    _add_launch_args(train)
    check = commands.add_parser(
        "check", help="validate a recipe; print it resolved, with size, FLOPs and memory"
    )
    _add_recipe_args(check)
    data = commands.add_parser("data", help="data tools")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    demo = data_commands.add_parser("demo", help="build the bundled demo corpus and tokenizer")
    demo.add_argument("--out", default="data/demo", help="output folder (default data/demo)")
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out whole even if it holds files the demo did not write",
    )
    _add_tokenizer_parser(data_commands)
    _add_prepare_parser(data_commands)
    show = data_commands.add_parser(
        "show",
        help="print the text of global training samples of a recipe's data order (e.g. a skipped range)",
    )
    _add_recipe_args(show)
    show.add_argument("--range", required=True, dest="sample_range", metavar="START:END",
                      help="global sample positions [START, END), e.g. a `samples` pair of skipped_data.jsonl")  # fmt: skip
    _add_convert(commands)
    _add_ckpt_commands(commands)
    _add_slurm_commands(commands)
    _add_smoke_command(commands)
    _add_plot_command(commands)
    return parser


def _add_plot_command(commands: argparse._SubParsersAction) -> None:
    """`loom plot RUN_DIR ... --out FILE` (launcher/plot.py)."""
    plot = commands.add_parser(
        "plot", help="draw loss, validation loss, lr, grad norm, tokens/s (and MoE load) of runs, overlaid"
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (their metrics.jsonl)")
    plot.add_argument("--out", required=True, help="the picture to write: .png, .pdf or .svg (a new file)")
    plot.add_argument("--x", choices=["tokens", "step"], default="tokens", help="x axis (default tokens)")
    plot.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _add_smoke_command(commands: argparse._SubParsersAction) -> None:
    """`loom smoke [RECIPE]` (launcher/smoke.py, docs/benchmarks.md)."""
    smoke = commands.add_parser(
        "smoke", help="train a small recipe on one GPU (or the CPU) and check loss, resume, HF export, speed"
    )
    smoke.add_argument("recipe", nargs="?", default=None, help="YAML recipe (default recipes/smoke.yaml)")
    smoke.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a field"
    )
    smoke.add_argument("--run-dir", default=None, help="keep the runs here (default: a temporary folder)")


def _add_ckpt_commands(commands: argparse._SubParsersAction) -> None:
    ckpt = commands.add_parser(
        "ckpt", help="checkpoint tools: inspect, consolidate (see docs/checkpoints.md)"
    )
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", required=True, parser_class=_Parser)
    inspect = ckpt_commands.add_parser(
        "inspect", help="step, tokens, layout, model and tensors of a checkpoint"
    )
    inspect.add_argument("path", help="a step directory, or a checkpoint root (follows 'latest')")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    verify = ckpt_commands.add_parser(
        "verify", help="check a whole checkpoint: markers, meta, index, sizes, sha256 of every file"
    )
    verify.add_argument("path", help="a step directory, or a checkpoint root (follows 'latest')")
    consolidate = ckpt_commands.add_parser(
        "consolidate", help="the full model of a checkpoint of any layout as safetensors (CPU, one process)"
    )
    consolidate.add_argument("path", help="a step directory, or a checkpoint root (follows 'latest')")
    consolidate.add_argument("out", help="a new (or empty) output folder")
    consolidate.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: as saved")
    consolidate.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty OUT whole (never a mix)"
    )


def _run_ckpt(args: argparse.Namespace) -> int:
    if args.ckpt_command == "verify":
        from framework.checkpoint.verify import verify_command

        print(verify_command(args.path))
        return 0
    if args.ckpt_command == "inspect":
        import json

        from framework.checkpoint.inspect import format_report, inspect_checkpoint

        report = inspect_checkpoint(args.path)
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return 0
    from framework.convert.consolidate import consolidate

    print(f"wrote {consolidate(args.path, args.out, args.dtype, overwrite=args.overwrite)}")
    return 0


def _add_convert(commands: argparse._SubParsersAction) -> None:
    convert = commands.add_parser(
        "convert", help="convert a checkpoint to a Hugging Face folder (--to hf) or back (--from hf)"
    )
    convert.add_argument(
        "source", help="a checkpoint (step directory or root) with --to; an HF folder with --from"
    )
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--to", choices=["hf", "megatron"], help="export the checkpoint SOURCE to this format"
    )
    direction.add_argument(
        "--from", dest="from_", choices=["hf", "megatron"],
        help="import SOURCE, a Hugging Face folder or a megatron-core torch_dist checkpoint",
    )  # fmt: skip
    convert.add_argument("out", help="output folder (new or empty; see --overwrite)")
    convert.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty OUT whole (never a mix)"
    )
    convert.add_argument(
        "--tokenizer", default=None,
        help="--to hf: a sentencepiece model, tokenizer.json or HF tokenizer folder (default: the recipe's)",
    )  # fmt: skip
    convert.add_argument(
        "--no-tokenizer", action="store_true", help="--to hf: export the weights and config alone"
    )
    convert.add_argument(
        "--max-shard-size", default="5GB", help="--to hf: split weights into files of at most this size"
    )
    convert.add_argument(
        "--megatron-config", default=None,
        help="--from megatron: the model's megatron_config.yaml (default: SOURCE/megatron_config.yaml, else "
        "Megatron-LM's args in SOURCE/common.pt)",
    )  # fmt: skip
    convert.add_argument(
        "--trust-checkpoint", action="store_true",
        help="--from megatron: unpickle common.pt fully (runs code from the file; only for checkpoints you trust)",
    )  # fmt: skip


SLURM_COMMANDS = ("submit", "status", "logs", "cancel")


def _add_slurm_commands(commands: argparse._SubParsersAction) -> None:
    """`loom submit/status/logs/cancel` (launcher/slurm.py, docs/slurm.md)."""
    submit = commands.add_parser(
        "submit", help="submit a recipe as a Slurm job (sbatch); --dry-run prints it"
    )
    _add_recipe_args(submit)
    group = submit.add_argument_group("overrides of the recipe's launch section")
    group.add_argument("--nodes", type=int, metavar="N", help="nodes (launch.nnodes)")
    group.add_argument(
        "--gpus-per-node", type=int, metavar="G", help="GPUs and workers per node (launch.gpus_per_node)"
    )
    group.add_argument(
        "--nproc-per-node", type=int, metavar="P", help="workers per node (launch.nproc_per_node)"
    )
    group.add_argument("--partition", metavar="P", help="Slurm partition (launch.partition)")
    group.add_argument("--time", metavar="T", help="time limit, e.g. 04:00:00 (launch.time)")
    group.add_argument("--account", metavar="A", help="Slurm account (launch.account)")
    submit.add_argument("--dry-run", action="store_true", help="print the job script; submit nothing")
    commands.add_parser("status", help="state of the Slurm jobs submitted from this directory")
    for name, verb in (("logs", "print the log of"), ("cancel", "cancel")):
        sub = commands.add_parser(name, help=f"{verb} a job submitted from this directory")
        sub.add_argument("job", nargs="?", default=None, help="job id (default: the newest)")


def _run_slurm(args: argparse.Namespace) -> int:
    from launcher import slurm

    if args.command == "status":
        print(slurm.status())
    elif args.command == "logs":
        print(slurm.logs(args.job), end="")
    elif args.command == "cancel":
        print(slurm.cancel(args.job))
    else:
        flags = ("nodes", "gpus_per_node", "nproc_per_node", "partition", "time", "account")
        overrides = [*args.overrides, *slurm.flag_overrides(**{f: getattr(args, f) for f in flags})]
        job = slurm.render(args.recipe, overrides)
        if args.dry_run:
            print(job.script, end="")
            return 0
        record = slurm.submit(job, args.recipe)
        print(f"submitted job {record.job_id} ({record.name}); log: {record.log}")
    return 0


def _nodes(args: argparse.Namespace) -> Nodes | None:
    """The multi-node rendezvous of `loom train` (None: one machine), every mistake a ConfigError before launch."""
    values = {flag: getattr(args, name) for name, flag in MULTI_NODE_FLAGS.items()}
    given = {flag: value for flag, value in values.items() if value is not None}
    if args.nproc is not None and args.nproc < 1:
        raise _cli_error(
            "--nproc", args.nproc, "must be >= 1", "the worker processes to start on this machine"
        )
    if not given:
        return None
    if len(given) < len(MULTI_NODE_FLAGS):
        missing = ", ".join(flag for flag in values if flag not in given)
        flag, value = next(iter(given.items()))
        raise _cli_error(flag, value, f"needs {missing} as well", _NODES_FIX)
    if args.nproc is None:
        raise _cli_error("--nproc", None, "is required with --nnodes/--node-rank/--master", "add --nproc N")
    if args.nnodes < 1:
        raise _cli_error("--nnodes", args.nnodes, "must be >= 1", "the number of machines in the run")
    if not 0 <= args.node_rank < args.nnodes:
        rule = f"must be in 0..{args.nnodes - 1} with --nnodes {args.nnodes}"
        raise _cli_error("--node-rank", args.node_rank, rule, "number the machines 0 .. nnodes-1")
    return Nodes(args.nnodes, args.node_rank, *_master_address(args.master))


def _master_address(value: str) -> tuple[str, int]:
    """'ADDR:PORT' (an IPv6 address in brackets: '[::1]:29500') -> (ADDR, PORT)."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    fix = "node 0's address and a free port, e.g. --master 10.0.0.1:29500"
    if not sep or not host or any(c.isspace() for c in host) or not port.isdecimal():
        raise _cli_error("--master", value, "must be ADDR:PORT", fix)
    if not 1 <= int(port) <= 65535:
        raise _cli_error("--master", value, "port must be in 1..65535", fix)
    return host, int(port)


def _cli_error(flag: str, value: object, rule: str, fix: str) -> ConfigError:
    return ConfigError("command line", flag, value, rule, fix)


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """Each worker's command line: `train` with the recipe, overrides and resume of this one, and none of the
    launch flags (rebuilt from the parsed arguments, so abbreviations such as --npr cannot leak through)."""
    argv = ["train", args.recipe]
    for override in args.overrides:
        argv += ["--set", override]
    if args.resume is not None:
        argv += ["--resume", args.resume]
    # The flags travel as given; the workers leave the run dir itself alone (the launcher checked, moved aside
    # and locked it before they started: launcher.local.run_dir_guard)
    if args.overwrite:
        argv.append("--overwrite")
    if args.accept_data_change:
        argv.append("--accept-data-change")
    return argv


def _launch(args: argparse.Namespace, nodes: Nodes | None) -> int:
    from framework.config.loader import load_recipe
    from framework.parallel.dims import ParallelDims
    from launcher.local import launch, run_dir_guard

    world_size = args.nproc * (nodes.nnodes if nodes is not None else 1)
    # A bad layout is one ConfigError here, before any worker starts and each prints it.
    recipe = load_recipe(args.recipe, args.overrides)
    ParallelDims.from_recipe(recipe, world_size)
    with run_dir_guard(recipe, args.resume, args.overwrite, nodes, args.accept_data_change):
        return launch(args.nproc, _worker_argv(args), nodes, run_dir=recipe.logging.run_dir)


def _configure_worker_logging() -> None:
    """In a torchrun worker (a process of its own, RANK set): Loom's INFO records (the layout, this rank's
    coordinates) on stderr, tagged with the rank. A plain `loom train` (and tests calling main in-process) keep
    Python's default: warnings and errors only."""
    rank = os.environ.get("RANK")
    logger = logging.getLogger("framework")
    if rank is None or logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def run(argv: Sequence[str]) -> int:
    """Run one command; raises ConfigError for user mistakes (see `main`)."""
    args = build_parser().parse_args(list(argv))
    if args.command == "check":
        from launcher.check import check

        print(check(args.recipe, args.overrides))
        return 0
    if args.command == "train":
        nodes = _nodes(args)
        if nodes is not None or (args.nproc or 1) > 1:
            return _launch(args, nodes)
        from framework.config.loader import load_recipe
        from framework.run import train
        from framework.run_dir import LAUNCHED_ENV
        from framework.train.callbacks.preemption import Preempted
        from launcher.exit_codes import EXIT_PREEMPTED

        if os.environ.get(LAUNCHED_ENV):
            from launcher.local import restore_preemption_signals

            restore_preemption_signals()  # its agent ignores them; the Checkpointer's handler takes them later
        _configure_worker_logging()
        recipe = load_recipe(args.recipe, args.overrides)
        try:
            train(
                recipe,
                resume=args.resume,
                overwrite=args.overwrite,
                accept_data_change=args.accept_data_change,
            )
        except Preempted as stop:
            if os.environ.get("RANK", "0") == "0":  # one line for the run, not one per worker
                print(f"loom: {stop}", file=sys.stderr)
            # A worker of Loom's launcher exits 0: the launcher makes the run's 75 from the preemption record;
            # a 75 here would be a failed worker to torchrun (SIGTERM to the others, a traceback in the log)
            return 0 if os.environ.get(LAUNCHED_ENV) else EXIT_PREEMPTED
        return 0
    if args.command == "data":
        _run_data(args)
        return 0
    if args.command == "convert":
        from framework.convert.command import convert

        print(
            convert(
                args.source,
                args.out,
                to=args.to,
                tokenizer=args.tokenizer,
                max_shard=args.max_shard_size,
                from_=args.from_,
                megatron_config=args.megatron_config,
                trust_checkpoint=args.trust_checkpoint,
                overwrite=args.overwrite,
                with_tokenizer=not args.no_tokenizer,
            )  # fmt: skip
        )
        return 0
    if args.command == "ckpt":
        return _run_ckpt(args)
    if args.command in SLURM_COMMANDS:
        return _run_slurm(args)
    if args.command == "smoke":
        from launcher.smoke import run_smoke

        return run_smoke(args.recipe, args.overrides, args.run_dir)
    if args.command == "plot":
        from launcher.plot import plot_command

        print(plot_command(args.run_dirs, args.out, x=args.x, overwrite=args.overwrite))
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # argparse only lets known commands through


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: user mistakes become one line on stderr and exit status 2."""
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"loom: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:  # a disk, permission or path problem: errno's words and the path, no traceback
        from framework.outputs import describe_os_error

        print(f"loom: error: {describe_os_error(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("loom: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
