"""The web demo, runnable from a checkout: the same app as ``python -m multimodal_lora.demo``.

    python demo/app.py [--adapters-dir runs] [--port 7860] [--share] ...

See ``python demo/app.py --help`` for the options.
"""

import sys
from pathlib import Path

# Let `python demo/app.py` work from a checkout that was not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multimodal_lora.commands.demo import cli  # noqa: E402

if __name__ == "__main__":
    cli()
