"""How a process of ours logs: our messages to stderr, the libraries' chatter at warning level.

Called by every command (:mod:`multimodal_lora.commands`) and by the processes a command
starts that configure themselves (the server's engine process).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def setup_logging(verbose: bool = False) -> None:
    """Log our messages to stderr; keep the libraries' chatter at warning level."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("multimodal_lora").setLevel(level)
    # transformers and PEFT report progress on weight loading that says nothing to our users.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
