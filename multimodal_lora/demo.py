"""The web demo: caption images and ask questions about them, with the base and every adapter.

    python -m multimodal_lora.demo                 # adapters under runs/, http://127.0.0.1:7860
    python demo/app.py --adapters-dir runs --port 7861

One :class:`~multimodal_lora.inference.captioner.Captioner` holds the base and all the
adapters found under ``--adapters-dir``; the page only calls its public
``caption`` and ``ask``. The defaults are safe to run on a shared machine:
bound to 127.0.0.1, no public share link unless ``--share``, uploads limited in
size and kept in a temporary directory of their own, no extra paths served, a
queue that runs one generation at a time and turns away requests beyond
``--max-queue``. An upload that is not a readable image gets a message in the
page, and the server keeps serving.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from multimodal_lora.core.errors import UserError
from multimodal_lora.core.generation import GenerationOptions
from multimodal_lora.core.tasks import TASKS
from multimodal_lora.evaluate.report import legible

if TYPE_CHECKING:
    from multimodal_lora.adapter import Found

logger = logging.getLogger(__name__)

# Versions with the fixes the demo relies on: gradio 6.16 (published path-traversal
# and SSRF fixes in the file routes), torch 2.6 (torch.load is weights_only by default).
MIN_GRADIO = "6.16"
MIN_TORCH = "2.6"

DEFAULT_ADAPTERS_DIR = "runs"
BASE_CHOICE = "(base)"
"""The dropdown value that means "no adapter"."""
EXAMPLES = 4
TOAST_SECONDS = 8
"""Error messages close by themselves after this long, so that a few mistakes do not pile them up."""


def check_versions() -> None:
    """Refuse to serve with a gradio or torch older than the fixes the demo relies on."""
    import gradio
    import torch
    from packaging.version import Version

    if Version(gradio.__version__) < Version(MIN_GRADIO):
        raise UserError(
            f"gradio {gradio.__version__} is too old: the demo needs >= {MIN_GRADIO} (path-traversal and SSRF "
            f"fixes); pip install -U 'gradio>={MIN_GRADIO}'"
        )
    if Version(torch.__version__.split("+")[0]) < Version(MIN_TORCH):
        raise UserError(f"torch {torch.__version__} is too old: the demo needs >= {MIN_TORCH} (safe torch.load)")


def example_images(directory: Path, count: int = EXAMPLES) -> list[str]:
    """Copy a few bundled validation images into ``directory`` (the app's temp dir) and list them.

    Copied rather than referenced so that the app serves nothing from outside
    its own temporary directory (no extra ``allowed_paths``).
    """
    from multimodal_lora.data.shapes import ensure_builtin

    source = ensure_builtin("shapes") / "validation"
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for path in sorted(source.glob("*.png"))[:count]:
        target = directory / path.name
        shutil.copyfile(path, target)
        out.append(str(target))
    return out


def status_text(found: Found, adapters_dir: str | Path, base: str) -> str:
    """The line above the tabs: which base, which adapters, what was skipped."""
    lines = [f"**Base:** `{base}`"]
    if found.adapters:
        listed = ", ".join(f"`{n}` ({found.tasks[n]})" for n in found.adapters)
        lines.append(f"**Adapters** from `{adapters_dir}`: {listed}")
    else:
        lines.append(
            f"**No adapter found under `{adapters_dir}`**: captions come from the base alone. Train one with "
            "`python -m multimodal_lora.train recipes/tiny.yaml` and restart the demo."
        )
    if found.problems:
        lines.append(f"**{len(found.problems)} unusable** (not offered):")
        lines.extend(f"- {problem}" for problem in found.problems)
    return "\n\n".join(lines)


def refused(message: str):
    """A ``gr.Error`` for the page, and one line in the server log (gradio would print a whole traceback)."""
    import gradio as gr

    logger.warning("refused: %s", message)
    return gr.Error(message, duration=TOAST_SECONDS, print_exception=False)


def base_note(base: str, found: Found) -> str:
    """One paragraph near the upload on what the loaded model can be expected to know."""
    from multimodal_lora.model.tiny import TINY_NAME

    tasks = sorted(set(found.tasks.values()))
    taught = f" Its adapters add: {', '.join(tasks)}." if tasks else ""
    if base == TINY_NAME:
        return (
            "**What this model knows:** the built-in *tiny* base has random weights, so on its own it "
            'produces noise. Its adapters were trained only on **coloured shapes** ("a red circle", '
            '"What colour is the shape?"): any image, a photo included, gets a shape answer. '
            "Try the bundled examples below."
        )
    return f"**What this model knows:** `{base}`, a pretrained image captioner, and whatever its adapters were trained on.{taught}"


def theme():
    """Gradio's default look with a system font first: the Source Sans Pro that gradio serves
    locally renders capitals smaller than lower case in headings ("BLIP-2", "LoRA")."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "Liberation Sans", "DejaVu Sans", "Arial", "sans-serif"])


CSS = """
#base-note { font-size: 0.95em; border-left: 3px solid var(--color-accent); padding-left: 0.6em; }
#preview img { object-fit: contain; }
"""


def _quiet_file_checks(component) -> None:
    """Gradio's own upload checks (the file type) raise errors it prints with a traceback: make them one line."""
    check = component._process_single_file

    def process(payload):
        import gradio as gr

        try:
            return check(payload)
        except gr.Error as exc:
            raise refused(exc.message) from None

    component._process_single_file = process


def read_upload(path: str | None):
    """Decode an uploaded file as an RGB image, or raise a ``gr.Error`` the page shows."""
    from multimodal_lora.data.images import MAX_PIXELS, TooManyPixels, load_image

    if not path:
        raise refused("Upload an image first (or click one of the examples).")
    label = Path(path).name
    try:
        return load_image(path, name=label, max_pixels=MAX_PIXELS)
    except TooManyPixels as exc:
        if exc.size is None:
            raise refused(str(exc)) from None
        width, height = exc.size
        raise refused(f"{label}: {width}×{height} pixels is more than this demo takes ({MAX_PIXELS:,}); resize it.") from None
    except UserError as exc:
        raise refused(str(exc)) from None


class Handlers:
    """What the page's buttons call: the Captioner's public ``caption``/``ask`` on the upload.

    Each tab offers its own task's adapters: a VQA adapter asked for a caption (or the
    reverse) answers in the wrong form, so the two are never mixed.
    """

    def __init__(self, captioner, found: Found):
        self.captioner, self.found = captioner, found

    def to_adapter(self, choice: str | None, task: str) -> str | None:
        found = self.found
        if not choice or choice == BASE_CHOICE:
            return None
        if choice not in found.adapters:
            raise refused(f"No adapter named {choice!r} is loaded; choose one from the list.")
        if found.tasks[choice] != task:
            tab = TASKS[found.tasks[choice]].title
            raise refused(f"{choice!r} is a {found.tasks[choice]} adapter, not a {task} one; use it in the {tab} tab.")
        return choice

    def caption(self, path, choice, side_by_side, prompt, max_new_tokens, num_beams, do_sample, temperature, top_p):
        captioner = self.captioner
        image = read_upload(path)
        adapter = self.to_adapter(choice, "caption")
        opts = _run(lambda: _options(max_new_tokens, num_beams, do_sample, temperature, top_p)).keywords()
        text = _run(lambda: captioner.caption(image, adapter=adapter, prompt=prompt or None, **opts))
        base_text = ""
        if side_by_side and adapter is not None:
            base_text = legible(_run(lambda: captioner.caption(image, adapter=None, prompt=prompt or None, **opts)))
        return path, text if adapter is not None else legible(text), base_text

    def ask(self, path, question, choice, max_new_tokens, num_beams, do_sample, temperature, top_p):
        image = read_upload(path)
        if not question or not question.strip():
            raise refused("Type a question about the image.")
        adapter = self.to_adapter(choice, "vqa")
        opts = _run(lambda: _options(max_new_tokens, num_beams, do_sample, temperature, top_p)).keywords()
        answer = _run(lambda: self.captioner.ask(image, question.strip(), adapter=adapter, **opts))
        return path, answer if adapter is not None else legible(answer)

    @staticmethod
    def preview(path):
        """Show the upload at once (and say at once if it is not an image), before any button is pressed."""
        if not path:
            return None
        read_upload(path)
        return path


def _options(max_new_tokens, num_beams, do_sample, temperature, top_p) -> GenerationOptions:
    """The settings' sliders as one checked value (a bad one is refused in the page, by :func:`_run`)."""
    return GenerationOptions(
        max_new_tokens=int(max_new_tokens),
        num_beams=int(num_beams),
        do_sample=bool(do_sample),
        temperature=float(temperature),
        top_p=float(top_p),
    )


def _run(call):
    """Turn what the user can fix into a message in the page; log the rest and say so."""
    import gradio as gr

    try:
        return call()
    except gr.Error:
        raise
    except UserError as exc:
        raise refused(str(exc)) from None
    except Exception:
        logger.exception("generation failed")
        raise refused("Something went wrong while generating; the server log has the details.") from None


def build_app(
    captioner,
    found: Found,
    *,
    adapters_dir: str | Path = DEFAULT_ADAPTERS_DIR,
    examples_dir: Path | None = None,
    concurrency_limit: int = 1,
    max_queue: int = 64,
):
    """The Gradio app around a loaded Captioner: a Caption tab, a VQA tab, shared generation settings.

    Returns:
        A ``gr.Blocks`` with its queue configured; call ``launch`` on it.
    """
    import gradio as gr

    handlers = Handlers(captioner, found)
    examples = example_images(examples_dir) if examples_dir is not None else []
    # One upload for both tabs, so an image chosen on Caption is still there on VQA. It is a
    # File (not an Image) so that a bad file reaches read_upload and gets its message; the
    # preview beside it shows the uploaded file itself, served from the upload directory:
    # re-encoding it would write one cache file per image content, which gradio rewrites in
    # place while concurrent requests may be reading it.
    with gr.Blocks(title="multimodal_lora demo", analytics_enabled=False) as app:
        gr.Markdown("# multimodal_lora: BLIP-2 with LoRA adapters")
        gr.Markdown(status_text(found, adapters_dir, captioner.base.name), elem_id="status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=260):
                upload = gr.File(label="Image (used by both tabs)", file_types=["image"], type="filepath", elem_id="upload")
                _quiet_file_checks(upload)
                gr.Markdown(base_note(captioner.base.name, found), elem_id="base-note")
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[upload], label="Examples (bundled shapes)")
            with gr.Column(scale=1, min_width=260):
                seen = gr.Image(label="Preview", interactive=False, type="filepath", height=240, elem_id="preview")
        upload.change(handlers.preview, [upload], [seen], api_name=False, show_progress="hidden")
        with gr.Accordion("Generation settings", open=False):
            prompt = gr.Textbox(label="Caption prefix (optional)", placeholder="text the caption continues")
            max_new_tokens = gr.Slider(1, 60, value=30, step=1, label="max new tokens")
            num_beams = gr.Slider(1, 8, value=1, step=1, label="beams (1 = greedy)")
            do_sample = gr.Checkbox(value=False, label="sample")
            temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="temperature (when sampling)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p (when sampling)")
        settings = [max_new_tokens, num_beams, do_sample, temperature, top_p]
        _caption_tab(gr, handlers, [upload, prompt, *settings], seen, concurrency_limit)
        _vqa_tab(gr, handlers, [upload, *settings], seen, concurrency_limit)
    app.queue(max_size=max_queue, default_concurrency_limit=concurrency_limit)
    return app


def _choices(found: Found, task: str) -> tuple[list[tuple[str, str]], str]:
    """A tab's dropdown: the bare base and the adapters of ``task``; the first adapter is the default."""
    names = [n for n in found.adapters if found.tasks[n] == task]  # a task is caption or vqa (checked when read)
    return [("base model (no adapter)", BASE_CHOICE)] + [(n, n) for n in names], names[0] if names else BASE_CHOICE


def _caption_tab(gr, handlers: Handlers, inputs: list, seen, concurrency_limit: int) -> None:
    """The Caption tab; ``inputs``: the upload, the caption prefix and the generation settings."""
    upload, prompt, *settings = inputs
    choices, default = _choices(handlers.found, "caption")
    with gr.Tab("Caption"):
        with gr.Row():
            with gr.Column():
                c_adapter = gr.Dropdown(
                    choices,
                    value=default,
                    label="Adapter (caption)",
                    elem_id="caption-adapter",
                    # Our own check refuses an unknown or cross-task name in one line; gradio's
                    # would log a whole traceback.
                    allow_custom_value=True,
                )
                c_compare = gr.Checkbox(value=False, label="Side by side: also caption with the base alone")
                c_button = gr.Button("Caption", variant="primary", elem_id="caption-button")
            with gr.Column():
                c_text = gr.Textbox(label="Caption", elem_id="caption-output", interactive=False)
                c_base = gr.Textbox(
                    label="Base model alone, no adapter (untrained output: · marks bytes that are not text)",
                    interactive=False,
                    elem_id="caption-base",
                )
        c_button.click(
            handlers.caption,
            [upload, c_adapter, c_compare, prompt, *settings],
            [seen, c_text, c_base],
            api_name="caption",
            concurrency_limit=concurrency_limit,
        )


def _vqa_tab(gr, handlers: Handlers, inputs: list, seen, concurrency_limit: int) -> None:
    """The VQA tab; ``inputs``: the upload and the generation settings."""
    upload, *settings = inputs
    choices, default = _choices(handlers.found, "vqa")
    with gr.Tab("VQA"):
        with gr.Row():
            with gr.Column():
                q_question = gr.Textbox(label="Question", value="What colour is the shape?", elem_id="vqa-question")
                q_adapter = gr.Dropdown(
                    choices, value=default, label="Adapter (VQA)", elem_id="vqa-adapter",
                    allow_custom_value=True,
                )
                q_button = gr.Button("Ask", variant="primary", elem_id="vqa-button")
            with gr.Column():
                q_answer = gr.Textbox(label="Answer", elem_id="vqa-output", interactive=False)
        q_button.click(
            handlers.ask,
            [upload, q_question, q_adapter, *settings],
            [seen, q_answer],
            api_name="ask",
            concurrency_limit=concurrency_limit,
        )


def serve(
    adapters_dir: str | Path = DEFAULT_ADAPTERS_DIR,
    *,
    base: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    max_file_size: str = "10mb",
    concurrency_limit: int = 1,
    max_queue: int = 64,
    block: bool = True,
):
    """Load the base and adapters, build the app and serve it.

    Args:
        adapters_dir: searched for adapter directories (default: ``runs``, where the trainer writes).
        base: the base model; defaults to the base the first adapter records, else ``tiny``.
        device, dtype, quantization: how to load the base; by default as the first
            adapter was trained (else ``auto``, ``fp32``, ``none``).
        host: the address to bind; ``127.0.0.1`` keeps the demo on this machine.
        share: also open a public ``*.gradio.live`` link (off unless asked).
        max_file_size: the largest upload accepted, e.g. ``10mb``.
        concurrency_limit: generations run at once (one model, so 1 is usually right).
        max_queue: requests waiting beyond this are turned away.
        block: keep serving until interrupted (``False``: return the launched app).

    Returns:
        The launched ``gr.Blocks`` (when ``block=False``).
    """
    check_versions()
    # A temporary directory of our own for uploads and served files, made before
    # gradio reads GRADIO_TEMP_DIR, and removed when the process ends.
    temp_dir = Path(tempfile.mkdtemp(prefix="multimodal-lora-demo-"))
    os.environ["GRADIO_TEMP_DIR"] = str(temp_dir)
    atexit.register(shutil.rmtree, temp_dir, ignore_errors=True)

    from multimodal_lora.adapter import find_adapters
    from multimodal_lora.inference.captioner import Captioner

    found = find_adapters(adapters_dir)
    captioner = Captioner.for_adapters(found, base, quantization=quantization, dtype=dtype, device=device)
    for problem in found.problems:
        logger.warning("%s", problem)
    logger.info("base %s with %d adapter(s): %s", captioner.base.name, len(found.adapters), ", ".join(found.adapters) or "none")
    app = build_app(
        captioner,
        found,
        adapters_dir=adapters_dir,
        examples_dir=temp_dir / "examples",
        concurrency_limit=concurrency_limit,
        max_queue=max_queue,
    )
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=max_file_size,
        allowed_paths=None,
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        footer_links=["api"],
        prevent_thread_lock=not block,
        theme=theme(),
        css=CSS,
        quiet=False,
    )
    return app


if __name__ == "__main__":  # python -m multimodal_lora.demo
    from multimodal_lora.commands.demo import cli

    cli()
