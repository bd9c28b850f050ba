"""The cache command: list or remove what multimodal_lora has cached.

    python -m multimodal_lora.cache list                      # every entry, its size and last use
    python -m multimodal_lora.cache clear                     # all image feature caches
    python -m multimodal_lora.cache clear --older-than 7      # those unused for a week
    python -m multimodal_lora.cache clear KEY ...             # the named feature caches
    python -m multimodal_lora.cache clear --all               # everything (rebuilt on next use)
"""

from __future__ import annotations

import argparse
import time

from multimodal_lora.cache import FEATURES, cache_dir, clear, entries
from multimodal_lora.commands import run_cli


def main(argv: list[str] | None = None) -> int:
    from multimodal_lora.core.atomic import format_bytes

    parser = argparse.ArgumentParser(
        prog="python -m multimodal_lora.cache", description="List or remove what multimodal_lora has cached."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every entry with its size and when it was last used")
    remove = commands.add_parser("clear", help="remove image feature caches (all, named, or unused ones)")
    remove.add_argument("keys", nargs="*", help="feature cache names, as `list` shows them (default: all)")
    remove.add_argument("--older-than", type=float, metavar="DAYS", help="only those not used for DAYS days")
    remove.add_argument("--all", action="store_true", help="everything, the tiny base and bundled data included")
    args = parser.parse_args(argv)
    root = cache_dir()
    if args.command == "list":
        found = entries(root)
        print(f"{root}  ({format_bytes(sum(e.bytes for e in found))})")
        for e in found:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
            name = f"{FEATURES}/{e.path.name}" if e.kind == "features" else e.path.name
            print(f"  {name:<36} {e.kind:<9} {format_bytes(e.bytes):>10}  last used {used}  {e.detail}".rstrip())
        return 0
    removed = clear(args.keys, everything=args.all, older_than_days=args.older_than, root=root)
    print(f"removed {len(removed)} entries ({format_bytes(sum(e.bytes for e in removed))}) from {root}")
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)

