"""`lmcompress anatomy`."""

from __future__ import annotations

import argparse

from lmcompress.cli.common import write_json

HELP = ("where a model's parameters and FLOPs live, by part and block, from its config alone (built on the meta "
        "device: nothing loaded or downloaded)")
AT_LEAST = {"seq_len": 1}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lmcompress.core.configs import shipped_names

    p.add_argument("model", metavar="MODEL", help="model directory (reads its config.json), config JSON file, or "
                   f"a shipped config: {', '.join(shipped_names())}")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence for FLOPs (default 128)")
    p.add_argument("--json", help="write the breakdown as JSON to this file")


def run(args: argparse.Namespace) -> None:
    from lmcompress.evaluation.anatomy import anatomy, describe

    result = anatomy(args.model, args.seq_len)
    print(describe(result))
    if args.json:
        write_json(args.json, result.to_dict())
