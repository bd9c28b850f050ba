"""Push an adapter and its model card to the Hugging Face hub.

    python -m multimodal_lora.push --adapter runs/tiny/adapter --repo-id OWNER/NAME [--private] [--revision BRANCH]

Everything that can be checked here is checked before the first request: the
adapter is complete (the weights open as safetensors), its ``README.md`` parses
as a model card, ``base_model`` is a hub id (an adapter of a local base needs
``--base-model OWNER/NAME``), the hub is not switched off (``HF_HUB_OFFLINE``)
and a token is available. Any of those, and a hub that cannot be reached or
refuses the token, ends in one line on stderr and a non-zero exit; nothing in
the adapter directory is changed (a card rewritten with ``--base-model`` is
uploaded from memory). The upload is one commit: the repository never shows
the weights without their card.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from multimodal_lora.adapter import CARD_FILE, CONFIG_FILE, META_FILE, WEIGHTS_FILE, read_adapter
from multimodal_lora.adapter.card import CardFacts, is_hub_id, render_card
from multimodal_lora.core.errors import UserError

logger = logging.getLogger(__name__)

UPLOADED = (CONFIG_FILE, WEIGHTS_FILE, META_FILE, CARD_FILE)
"""What a push uploads: the PEFT files, our metadata and the card; nothing else in the directory."""


class PushError(UserError):
    """The adapter cannot be pushed; the message says why (offline, no token, unreachable hub, ...)."""


@dataclass(frozen=True)
class Upload:
    """One commit's worth of files: path in the repository → bytes or a local file."""

    files: dict[str, bytes | Path]
    card: object
    """The ``huggingface_hub.ModelCard`` that is uploaded as ``README.md``."""


def prepare_upload(adapter: str | Path, base_model: str | None = None) -> Upload:
    """Check the adapter and build what would be uploaded; touches neither the network nor the directory.

    Args:
        adapter: an adapter directory (or a run directory holding ``adapter/``).
        base_model: the hub id to name as ``base_model`` when the adapter was
            trained on a local copy of a hub model.

    Raises:
        AdapterError: the adapter is incomplete or corrupt.
        PushError: the card is unreadable, or its ``base_model`` is not a hub id.
    """
    from huggingface_hub import ModelCard

    directory, meta = read_adapter(adapter)
    card_path = directory / CARD_FILE
    if card_path.is_file():
        try:
            card = ModelCard.load(card_path)
        except Exception as exc:  # huggingface_hub raises ValueError or yaml errors for bad front matter
            raise PushError(
                f"{card_path}: not a readable model card ({exc}); fix or delete it (a new one is then written)"
            ) from None
    elif meta is not None:
        # An adapter saved before cards existed: describe what multimodal_lora.json knows.
        card = render_card(meta, CardFacts(adapter_ref=str(directory)))
    else:
        raise PushError(f"{directory} has no {CARD_FILE} and no {META_FILE}; write a model card first")
    card_changed = not card_path.is_file()
    if base_model is not None:
        if not is_hub_id(base_model):
            raise PushError(f"--base-model {base_model!r} is not a hub id (OWNER/NAME)")
        card.data.base_model = base_model
        card_changed = True
    named = card.data.base_model
    if not named or not all(is_hub_id(b) for b in ([named] if isinstance(named, str) else named)):
        raise PushError(
            f"{card_path}: base_model is {named!r}, not a hub id, and the hub only accepts ids; "
            "pass --base-model OWNER/NAME (the hub model your local base is a copy of)"
        )
    files: dict[str, bytes | Path] = {name: directory / name for name in UPLOADED if (directory / name).is_file()}
    if card_changed:
        files[CARD_FILE] = str(card).encode("utf-8")
    return Upload(files=files, card=card)


def hub_ready() -> str:
    """The token to push with, after checking the hub is not switched off.

    Raises:
        PushError: ``HF_HUB_OFFLINE`` is set, or no token is configured.
    """
    from huggingface_hub import get_token, is_offline_mode

    if is_offline_mode():
        raise PushError(
            "offline: HF_HUB_OFFLINE is set, so nothing was pushed; unset it (and check the network) to push"
        )
    token = get_token()
    if not token:
        raise PushError(
            "no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access), then push again"
        )
    return token


def push(upload: Upload, repo_id: str, token: str, *, private: bool = False, revision: str | None = None) -> str:
    """Create the repository (and branch) if needed and upload in one commit.

    Returns:
        The URL of the commit.

    Raises:
        PushError: the hub cannot be reached, or it refused the request (the message says why).
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=source) for name, source in upload.files.items()
        ]
        info = api.create_commit(
            repo_id, operations, commit_message="Upload LoRA adapter with multimodal_lora", revision=revision
        )
    except _transport_errors() as exc:
        raise PushError(
            f"cannot reach the hub ({type(exc).__name__}: {exc}); nothing was pushed; check the network and try again"
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        hint = " (the token is invalid or lacks write access: run `hf auth login`)" if status in (401, 403) else ""
        raise PushError(f"the hub refused the push{hint}: {str(exc).splitlines()[0]}") from None
    return info.commit_url


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's "could not talk to the server" errors: huggingface_hub 1.x uses httpx, 2.x httpx2."""
    import importlib

    errors: list[type[Exception]] = []
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except ImportError:
            continue
    return tuple(errors) or (OSError,)


if __name__ == "__main__":  # python -m multimodal_lora.push
    from multimodal_lora.commands.push import cli

    cli()
