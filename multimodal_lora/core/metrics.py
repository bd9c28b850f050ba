"""Captioning metrics against all references of each image, offline.

BLEU-4, CIDEr-D and ROUGE-L come from ``pycocoevalcap`` (the COCO caption
evaluation code, pure Python); its CIDEr implementation is CIDEr-D (clipped
n-gram counts, a Gaussian length penalty with sigma 6, ×10), with document
frequencies taken from the evaluated references, as in the COCO server.
METEOR is ``pycocoevalcap``'s METEOR 1.5, which runs a bundled Java jar: it is
computed only when ``java`` is on the PATH (and costs some seconds of JVM start-up),
and reported as unavailable otherwise. Nothing is downloaded.

Text is normalised by a simple offline tokenizer (lower case, punctuation
removed, whitespace collapsed) instead of the Java PTB tokenizer the COCO
scripts use; for plain captions the two give the same tokens.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Sequence

logger = logging.getLogger(__name__)

METRICS = ("bleu4", "cider_d", "rouge_l", "meteor", "exact_match")
"""Metric keys, in report order."""

LABELS = {"bleu4": "BLEU-4", "cider_d": "CIDEr-D", "rouge_l": "ROUGE-L", "meteor": "METEOR", "exact_match": "exact match"}

SCALES = {
    "val_loss": "cross-entropy per target token, in nats (0 and up, lower is better)",
    "bleu4": "0 to 1, higher is better",
    "cider_d": "0 to 10 (CIDEr-D's x10), higher is better",
    "rouge_l": "0 to 1 (ROUGE-L F-measure), higher is better",
    "meteor": "0 to 1, higher is better",
    "exact_match": "fraction of images whose caption equals a reference after normalisation, 0 to 1",
}
"""What each reported number is measured in: reports and model cards print it beside the value."""

_PUNCTUATION = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """Lower case, punctuation removed, single spaces: what the metrics compare."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def meteor_available() -> bool:
    """METEOR needs a Java runtime for pycocoevalcap's jar."""
    return shutil.which("java") is not None


def caption_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, meteor: bool = True
) -> dict[str, float | None]:
    """Score one caption per image against all of that image's references.

    Args:
        predictions: the generated caption of each image.
        references: the reference captions of each image (same order).
        meteor: compute METEOR when Java is available (``None`` in the result otherwise).

    Returns:
        ``{"bleu4", "cider_d", "rouge_l", "meteor", "exact_match"}``, each in [0, 1]
        except CIDEr-D (0 to 10); ``meteor`` is ``None`` when not computed.

    Example:
        >>> caption_metrics(["a red circle"], [["a red circle", "red circle"]], meteor=False)["exact_match"]
        1.0
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    # An empty caption would break the scorers' n-gram code; score it as one unknown word.
    res = {i: [normalize(p) or "<empty>"] for i, p in enumerate(predictions)}
    gts = {i: [normalize(r) or "<empty>" for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    exact = sum(res[i][0] in gts[i] for i in res) / len(res)
    result: dict[str, float | None] = {
        "bleu4": float(bleu[3]),
        "cider_d": float(cider),
        "rouge_l": float(rouge),
        "meteor": None,
        "exact_match": float(exact),
    }
    if meteor and meteor_available():
        result["meteor"] = _meteor(gts, res)
    elif meteor:
        logger.warning("METEOR skipped: it needs java on the PATH (pycocoevalcap runs METEOR 1.5's jar)")
    return result


def _meteor(gts: dict, res: dict) -> float | None:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    except (OSError, ValueError) as exc:
        logger.warning("METEOR failed (%s); reporting it as unavailable", exc)
        return None
    finally:
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    return float(score)
