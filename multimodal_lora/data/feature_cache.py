"""Frozen-feature cache: the language model's visual prefix, computed once per image.

The vision encoder, the Q-Former and the language projection are frozen and
(in :func:`~multimodal_lora.model.base.set_train_mode`) deterministic, so each image
gives the same 32 × 2560 prefix (for BLIP-2 OPT-2.7B; 8 × 128 for the tiny
base) on every step. With ``train.cache_image_features: true`` that prefix is
computed once, stored, and training afterwards runs only the language model.

The cache lives in ``$MULTIMODAL_LORA_CACHE/features/<key>/``: ``features.npy``
(memory-mapped, one row per distinct image) and ``index.json`` (the dtype, and
image content hash → row). Features are stored in the dtype the language model
computes in: bf16 (kept as its raw 16 bits, which numpy cannot name) is 2 bytes
a value, so the real OPT-2.7B's prefix is 32 × 2560 × 2 = 160 KB an image,
16 GB for 100,000 images. The size is logged before building, and the build
is refused, naming the numbers, when the disk lacks the room.

The key hashes the frozen weights, the image processor's settings, the model
dtype and the content of every image, so changing any of them gives a new cache
instead of stale features. A cache is built in a temporary directory and renamed
into place whole. ``python -m multimodal_lora.cache list`` shows the caches and
``clear`` removes them.

When the Q-Former also reads the prompt (InstructBLIP), the prefix depends on
it too: a row is then one (image, instruction) pair, keyed by both.

**Ragged features** (Qwen2.5-VL, Qwen3-VL, SmolVLM: the family's
:class:`~multimodal_lora.families.image_inputs.ImageInputs` names
``cache_keeps``): an image's features vary in length (Qwen: one token per 2×2
patches of the resized image; SmolVLM: one block per view), and the text and
model still need a little per image (the grid, the tile grid). These are stored
as safetensors shards of about :data:`SHARD_BYTES` (``features-00000.safetensors``:
the shard's images' features end to end, one tensor per name, ``features.pooler_output``
(and Qwen3-VL's ``features.deepstack_N``, one per DeepStack tap),
and each kept key stacked, ``keep.image_grid_thw``), read through memory-mapped slices; ``index.json``
maps each image to its shard, row, first token and token count.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from multimodal_lora.core.atomic import atomic_dir, format_bytes, require_free_space
from multimodal_lora.data.images import StoredImage, load_image
from multimodal_lora.data.sources import Example
from multimodal_lora.families.image_inputs import PIXELS, ImageInputs

logger = logging.getLogger(__name__)

FEATURES_FILE = "features.npy"
INDEX_FILE = "index.json"
SHARD_FILE = "features-{:05d}.safetensors"
SHARD_BYTES = 256 * 2**20
"""About how large a shard of ragged features grows before it is written (it is held in memory until
then) and the next one starts: 64 files for 16 GB of features."""
FEATURES_KEY = "image_features"
"""A cached batch's list of each image's named ``(tokens, ...)`` features (ragged caches)."""
FORMAT = 2
"""Bumped when the files' layout changes, so that an older cache is never read as a newer one."""

# How each compute dtype is kept on disk: numpy has no bfloat16, so its 16 bits go in a uint16.
_STORED = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


def image_key(image: str | bytes | StoredImage, instruction: str | None = None) -> str:
    """SHA-256 of an image's encoded bytes (the file's content, not its name), and of the
    Q-Former's instruction when it reads one."""
    if isinstance(image, StoredImage):  # a row of an Arrow data set (hub, save_to_disk): its bytes or its file
        image = image.read()
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    key = hashlib.sha256(data).hexdigest()
    if instruction is not None:
        key += "-" + hashlib.sha256(instruction.encode()).hexdigest()[:16]
    return key


@dataclass
class FeatureCache:
    """Visual prefixes of a set of images, memory-mapped from disk."""

    directory: Path
    features: np.ndarray
    """``(images, query tokens, hidden)``, memory-mapped read-only, stored as :data:`_STORED` says."""
    rows: dict[str, int]
    """Image content hash → row of ``features``."""
    dtype: torch.dtype = torch.float32
    """The dtype the features were computed in (and are returned in)."""

    def prefix(self, key: str) -> torch.Tensor:
        """The prefix of one image (a copy, so the memory map is never written through)."""
        return torch.from_numpy(np.array(self.features[self.rows[key]])).view(self.dtype)

    @property
    def bytes_per_image(self) -> int:
        return int(np.prod(self.features.shape[1:])) * self.features.itemsize

    def dataset(self, encoded: list[dict[str, list[int]]], keys: list[str], layout=None) -> CachedPairDataset:
        """Encoded examples with their cached prefixes (the text already holds the prefix's positions)."""
        return CachedPairDataset(encoded, self, keys)

    def collator(self, collate) -> PrefixCollator:
        return PrefixCollator(collate)


def cache_key(image_keys: list[str], model_fingerprint: str, processor_settings: dict, dtype: torch.dtype) -> str:
    """What the features depend on, hashed: frozen weights, image processing, dtype, the images."""
    digest = hashlib.sha256()
    digest.update(f"format {FORMAT}".encode())
    digest.update(model_fingerprint.encode())
    digest.update(json.dumps(processor_settings, sort_keys=True, default=str).encode())
    digest.update(str(dtype).encode())
    for key in sorted(set(image_keys)):
        digest.update(key.encode())
    return digest.hexdigest()[:24]


def open_or_build(
    examples: list[Example],
    model,
    image_processor,
    root: Path,
    *,
    build: bool = True,
    batch_size: int = 32,
    progress: bool = True,
    instructions: list[str] | None = None,
    layout=None,
) -> tuple[FeatureCache, list[str]]:
    """Open the cache for these examples' images, building it first if it is missing.

    Args:
        examples: the examples whose images need prefixes.
        model: the base (or its PEFT wrapper) whose frozen image path computes them.
        image_processor: resizes and normalises images exactly as training would.
        root: the cache root (``cache_dir() / "features"``).
        build: ``False`` on processes that only wait for the main one to build it.
        instructions: each example's prompt, when the Q-Former reads it (``layout.reads_instruction``).
        layout: the base's token layout, which tokenizes ``instructions`` for the Q-Former; a layout
            whose image inputs name ``cache_keeps`` gets a :class:`RaggedFeatureCache`.

    Returns:
        ``(cache, keys)``: the cache (a :class:`FeatureCache` or a :class:`RaggedFeatureCache`)
        and each example's image key, in order.
    """
    from multimodal_lora.model.base import image_path_fingerprint, visual_prefix

    if instructions is None:
        instructions = [None] * len(examples)
    keys = [image_key(e.image, i) for e, i in zip(examples, instructions)]
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    settings = image_processor.to_dict()
    ragged = layout is not None and layout.image_inputs.cache_keeps is not None
    if ragged:  # another layout on disk, never to be read as the fixed one
        settings = {**settings, "ragged features keep": list(layout.image_inputs.cache_keeps)}
    directory = Path(root) / cache_key(keys, image_path_fingerprint(model), settings, dtype)
    if not (directory / INDEX_FILE).is_file():
        if not build:
            raise RuntimeError(f"feature cache {directory} was not built by the main process")
        if ragged:
            _build_ragged(directory, examples, keys, model, image_processor, layout.image_inputs, batch_size, progress)
        else:
            _build(directory, examples, instructions, keys, model, image_processor, layout, batch_size, progress, visual_prefix)
    else:
        logger.info("image features: using the cache in %s", directory)
        # Its last use, for `python -m multimodal_lora.cache clear --older-than DAYS`.
        with contextlib.suppress(OSError):
            os.utime(directory / INDEX_FILE)
    return (RaggedFeatureCache.open(directory) if ragged else read_cache(directory)), keys


def read_cache(directory: Path) -> FeatureCache:
    """Open a built cache directory (memory-mapped, read-only)."""
    index = json.loads((Path(directory) / INDEX_FILE).read_text())
    features = np.load(Path(directory) / FEATURES_FILE, mmap_mode="r")
    return FeatureCache(Path(directory), features, index["rows"], getattr(torch, index["dtype"]))


def feature_dtype(model) -> torch.dtype:
    """The dtype the language model takes its input embeddings in: what the prefix is stored as."""
    return model.get_input_embeddings().weight.dtype


@torch.no_grad()
def _build(directory, examples, instructions, keys, model, image_processor, layout, batch_size, progress, visual_prefix) -> None:
    from tqdm.auto import tqdm

    from multimodal_lora.model.base import prefix_shape

    unique: dict[str, tuple[Example, str | None]] = {}
    for key, example, instruction in zip(keys, examples, instructions):
        unique.setdefault(key, (example, instruction))
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    stored = feature_dtype(model)
    shape = (len(unique), *prefix_shape(model))
    per_image = int(np.prod(shape[1:])) * stored.itemsize
    what = (
        f"the image feature cache ({len(unique):,} images × {shape[1]} × {shape[2]} values × "
        f"{stored.itemsize} bytes ({str(stored).removeprefix('torch.')}) = {format_bytes(per_image)} an image)"
    )
    logger.info("%s: %s in %s", what, format_bytes(len(unique) * per_image), directory)
    # The .npy header is at most a few hundred bytes; what matters is the array.
    require_free_space(directory.parent, len(unique) * per_image + 4096, what)
    # Another process may build the same cache at once; its content is identical, so the first one stays.
    with atomic_dir(directory, "the image feature cache", if_exists="keep") as tmp:
        items = list(unique.items())
        features = np.lib.format.open_memmap(tmp / FEATURES_FILE, mode="w+", dtype=_STORED[stored], shape=shape)
        # Reserve the blocks now: a memory map over a full disk dies of SIGBUS, not an error.
        _reserve(tmp / FEATURES_FILE)
        bar = tqdm(total=len(items), desc="caching image features", unit="image", disable=not progress)
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            images = [load_image(e.image, name=e.origin if isinstance(e.image, bytes) else None) for _, (e, _) in chunk]
            pixels = image_processor(images, return_tensors="pt").pixel_values.to(device, dtype=dtype)
            qformer = {}
            if chunk[0][1][1] is not None:
                qformer = {k: v.to(device) for k, v in layout.qformer_inputs([i for _, (_, i) in chunk]).items()}
            prefix = visual_prefix(model, pixels, qformer).to(stored).cpu()
            features[start : start + len(chunk)] = prefix.view(torch.uint16 if stored == torch.bfloat16 else stored).numpy()
            bar.update(len(chunk))
        bar.close()
        features.flush()
        del features
        index = {"format": FORMAT, "dtype": str(stored).removeprefix("torch."), "rows": {key: row for row, (key, _) in enumerate(items)}}
        (tmp / INDEX_FILE).write_text(json.dumps(index))
    logger.info("image features: cached %d images in %s", len(items), directory)


class CachedPairDataset(torch.utils.data.Dataset):
    """Like :class:`~multimodal_lora.data.encoding.PairDataset`, with a cached prefix instead of pixels."""

    def __init__(self, encoded: list[dict[str, list[int]]], cache: FeatureCache, keys: list[str]):
        assert len(encoded) == len(keys)
        self.encoded = encoded
        self.cache = cache
        self.keys = keys

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> dict:
        return {"prefix": self.cache.prefix(self.keys[index]), **self.encoded[index]}


@dataclass(frozen=True)
class PrefixCollator:
    """Wraps a collator: pads the text as it does and stacks the cached prefixes."""

    collate: object

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collate([{k: v for k, v in item.items() if k != "prefix"} for item in items])
        batch["prefix"] = torch.stack([item["prefix"] for item in items])
        return batch


def forward_inputs(batch: dict, device: torch.device, image_inputs: ImageInputs = PIXELS) -> dict:
    """A collated batch as the model's keyword arguments, on ``device``: pixels, a cached prefix, or
    each image's cached features (fed as the layout's ``image_inputs`` says)."""
    from multimodal_lora.model.base import prefix_inputs

    inputs = {k: v.to(device) for k, v in batch.items() if k not in ("prefix", FEATURES_KEY)}
    if "prefix" in batch:
        inputs.update(prefix_inputs(batch["prefix"].to(device)))
    if FEATURES_KEY in batch:
        features = [{name: t.to(device) for name, t in image.items()} for image in batch[FEATURES_KEY]]
        inputs.update(image_inputs.feature_inputs(features))
    return inputs


# --- ragged features: a variable-length (tokens, hidden) tensor per image, and what it keeps -------


@dataclass
class RaggedFeatureCache:
    """Per-image features of varying length, read from safetensors shards through memory-mapped slices."""

    directory: Path
    rows: dict[str, list[int]]
    """Image content hash → ``[shard, row in shard, first token, tokens]``."""
    keeps: tuple[str, ...]
    """The item keys each image keeps beside its features (``image_grid_thw``)."""
    streams: tuple[str, ...]
    """The names of each image's features (``pooler_output``), stored as ``features.<name>``."""
    dtype: torch.dtype = torch.float32
    """The dtype the features were computed in and are stored in (safetensors keeps bf16 as it is)."""
    _shards: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: Path) -> RaggedFeatureCache:
        index = json.loads((Path(directory) / INDEX_FILE).read_text())
        keeps, streams = tuple(index["keeps"]), tuple(index["streams"])
        return cls(Path(directory), index["rows"], keeps, streams, getattr(torch, index["dtype"]))

    def item(self, key: str) -> dict:
        """One image's named features (``image_features``) and its kept keys, as its processed item held them."""
        shard, row, start, count = self.rows[key]
        f = self._shard(shard)
        out: dict = {FEATURES_KEY: {name: f.get_slice(f"features.{name}")[start : start + count] for name in self.streams}}
        out.update({k: f.get_slice(f"keep.{k}")[row : row + 1][0] for k in self.keeps})
        return out

    def _shard(self, shard: int):
        from safetensors import safe_open

        # Opened once per process: a DataLoader worker opens its own (see __getstate__).
        if shard not in self._shards:
            self._shards[shard] = safe_open(self.directory / SHARD_FILE.format(shard), framework="pt")
        return self._shards[shard]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": {}}

    def dataset(self, encoded: list[dict[str, list[int]]], keys: list[str], layout) -> RaggedPairDataset:
        """Encoded examples with their cached features, each placeholder expanded to its image's tokens."""
        return RaggedPairDataset(encoded, self, keys, layout)

    def collator(self, collate) -> FeatureCollator:
        return FeatureCollator(collate)


@torch.no_grad()
def _build_ragged(directory, examples, keys, model, image_processor, image_inputs: ImageInputs, batch_size, progress) -> None:
    """Run the frozen image path once per distinct image, ``batch_size`` images a call, into shards."""
    from tqdm.auto import tqdm

    from multimodal_lora.model.base import ragged_features

    unique = list(dict(zip(keys, examples)).items())
    device = next(model.parameters()).device
    stored = feature_dtype(model)
    what = f"the image feature cache ({len(unique):,} images, {str(stored).removeprefix('torch.')})"
    with atomic_dir(directory, "the image feature cache", if_exists="keep") as tmp:
        shards = _ShardWriter(tmp, image_inputs.cache_keeps)
        bar = tqdm(total=len(unique), desc="caching image features", unit="image", disable=not progress)
        for start in range(0, len(unique), batch_size):
            chunk = unique[start : start + batch_size]
            images = [load_image(e.image, name=e.origin if isinstance(e.image, bytes) else None) for _, e in chunk]
            items = image_inputs.split(image_processor(images, return_tensors="pt"))
            on_device = [{k: v.to(device) for k, v in item.items()} for item in items]
            features = [{n: t.to(stored).cpu() for n, t in f.items()} for f in ragged_features(model, image_inputs, on_device)]
            if start == 0:  # the first batch's size per image, for the whole: refused now, not hours in
                per_image = sum(t.numel() for f in features for t in f.values()) * stored.itemsize / len(chunk)
                logger.info("%s: about %s in %s", what, format_bytes(int(per_image * len(unique))), directory)
                require_free_space(directory.parent, int(per_image * len(unique) * 1.1) + 4096, what)
            for (key, _), item, f in zip(chunk, items, features):
                shards.add(key, f, item)
            bar.update(len(chunk))
        bar.close()
        shards.flush()
        index = {
            "format": FORMAT, "dtype": str(stored).removeprefix("torch."), "keeps": list(image_inputs.cache_keeps),
            "streams": shards.streams, "rows": shards.rows,
        }  # fmt: skip
        (tmp / INDEX_FILE).write_text(json.dumps(index))
    logger.info("image features: cached %d images (%s) in %s", len(unique), format_bytes(shards.written), directory)


class _ShardWriter:
    """Collects images' named features and kept keys, and writes them as a safetensors shard every
    :data:`SHARD_BYTES` (a few files however many images: each open shard holds a file handle)."""

    def __init__(self, directory: Path, keeps: tuple[str, ...]):
        self.directory, self.keeps = directory, keeps
        self.rows: dict[str, list[int]] = {}
        self.streams: list[str] = []
        self.written = 0
        self.shard = 0
        self._pending: list[tuple[dict[str, torch.Tensor], dict]] = []
        self._tokens = self._bytes = 0

    def add(self, key: str, features: dict[str, torch.Tensor], item: dict) -> None:
        count = {len(t) for t in features.values()}
        assert len(count) == 1, f"an image's features disagree on its token count: {count}"
        self.streams = self.streams or sorted(features)
        self.rows[key] = [self.shard, len(self._pending), self._tokens, count.pop()]
        self._pending.append((features, {k: item[k] for k in self.keeps}))
        self._tokens += self.rows[key][3]
        self._bytes += sum(t.numel() * t.element_size() for t in features.values())
        if self._bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        tensors = {f"features.{n}": torch.cat([f[n] for f, _ in self._pending]).contiguous() for n in self.streams}
        tensors.update({f"keep.{k}": torch.stack([kept[k] for _, kept in self._pending]) for k in self.keeps})
        save_file(tensors, str(self.directory / SHARD_FILE.format(self.shard)))
        self.written += sum(t.numel() * t.element_size() for t in tensors.values())
        self.shard, self._pending, self._tokens, self._bytes = self.shard + 1, [], 0, 0


class RaggedPairDataset(torch.utils.data.Dataset):
    """Like :class:`~multimodal_lora.data.encoding.PairDataset`, with each image's cached features instead of
    pixels; its placeholder is expanded from the kept keys as the pixels' item would expand it."""

    def __init__(self, encoded: list[dict[str, list[int]]], cache: RaggedFeatureCache, keys: list[str], layout):
        assert len(encoded) == len(keys)
        self.encoded = encoded
        self.cache = cache
        self.keys = keys
        self.layout = layout

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> dict:
        item = self.cache.item(self.keys[index])
        return {**item, **self.layout.with_image(self.encoded[index], item)}


@dataclass(frozen=True)
class FeatureCollator:
    """Wraps a collator: pads the text and joins the kept keys as it does, and lists the images' features."""

    collate: object

    def __call__(self, items: list[dict]) -> dict:
        batch = self.collate([{k: v for k, v in item.items() if k != FEATURES_KEY} for item in items])
        batch[FEATURES_KEY] = [item[FEATURES_KEY] for item in items]
        return batch


def _reserve(path: Path) -> None:
    """Allocate every block of a (sparse) file, so that running out of space is an ``OSError`` here."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return  # a file system without fallocate: nothing to reserve with
        raise
    finally:
        os.close(fd)
