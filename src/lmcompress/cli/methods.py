"""`lmcompress methods`."""

from __future__ import annotations

import argparse
import sys

HELP = "list compression methods and their options"


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(_args: argparse.Namespace) -> None:
    from lmcompress.methods import available_methods, get_method

    for name in available_methods():
        method = get_method(name)
        doc = (sys.modules[type(method).__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name}: {doc.removeprefix(f'`{name}`: ').removeprefix(f'`{name}` ')}")
        for field, info in method.config_class.model_fields.items():
            print(f"    {field} (default {info.default!r}): {info.description or ''}")
