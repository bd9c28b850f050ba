"""The push command: an adapter and its model card to the Hugging Face hub, in one commit.

    python -m multimodal_lora.push --adapter runs/tiny/adapter --repo-id OWNER/NAME [--private] [--revision BRANCH]

What is checked before the first request is in :mod:`multimodal_lora.push`.
"""

from __future__ import annotations

import argparse
import logging

from multimodal_lora.adapter.card import HUB_ID
from multimodal_lora.commands import run_cli
from multimodal_lora.core.log_setup import setup_logging
from multimodal_lora.push import PushError, hub_ready, prepare_upload, push

logger = logging.getLogger(__name__)

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m multimodal_lora.push",
        description="Push an adapter and its model card to the Hugging Face hub (one commit).",
        epilog="Example: python -m multimodal_lora.push --adapter runs/football/adapter --repo-id me/blip2-football",
    )
    parser.add_argument(
        "--adapter", required=True, help="adapter directory written by the trainer (OUTPUT_DIR/adapter)"
    )
    parser.add_argument("--repo-id", required=True, help="the hub model repository, OWNER/NAME (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", help="push to this branch (created from main if missing)")
    parser.add_argument(
        "--base-model", help="hub id to name as base_model when the adapter's base was a local directory"
    )
    args = parser.parse_args(argv)
    setup_logging()
    if not HUB_ID.fullmatch(args.repo_id):
        raise PushError(f"--repo-id {args.repo_id!r}: expected OWNER/NAME")
    upload = prepare_upload(args.adapter, args.base_model)
    token = hub_ready()
    url = push(upload, args.repo_id, token, private=args.private, revision=args.revision)
    logger.info("pushed %s to %s", ", ".join(upload.files), url)
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)

