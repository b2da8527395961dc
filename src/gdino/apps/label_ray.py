"""``gdino label DIR ... --ray [ADDRESS|auto]``: the same run as ``gdino.apps.label``, on a Ray cluster.

The driver (this process) keeps what ``gdino.apps.label`` does: it lists the images, opens the
journal, skips the images already journaled, and writes the same exports and ``errors.txt`` at
the end. Only the detection moves to Ray Data (imported here, lazily; ``pip install gdino[ray]``):

    names (from_items) -> read + resize, CPU tasks -> detect, an actor pool -> iter_batches (driver)

* Reading (decode, EXIF, RGB, resize to the model's input size) runs in CPU tasks anywhere in the
  cluster; an image that cannot be read becomes an error record there and never stops the run.
* Each actor loads the model once (a path every node can see, or a hub id in each node's cache),
  with one GPU when the cluster has GPUs (half a CPU and one torch thread otherwise, so that
  reading tasks still fit beside it), normalises the resized pixels and runs ``detect`` exactly
  as the single-process run does, so the records, and the exports, are byte for byte the same.
* The driver journals each batch of records as it streams in (``iter_batches``), so a driver
  killed and started again skips what was done. An actor process that dies is restarted by Ray
  and its batch retried (``max_restarts``, ``max_task_retries``); a record arriving twice is
  journaled once.

Memory is bounded whatever the folder's size: the dataset is never materialised. Ray Data
streams blocks of ``B = max(READ_BLOCK, --batch-size)`` names; a reading task turns one block
into B resized images (at most 800x1333x3 bytes, 3.2 MB, each), object-store backpressure caps
the blocks in flight between reading and the actors, every actor holds at most
``IN_FLIGHT_PER_ACTOR`` blocks (2 x 8 x 3.2 MB = 51 MB by default) and runs them ``--batch-size``
images at a time, and the driver keeps one block of records (plus, as ``gdino label`` does, the
journal's records). A block's records are journaled together: a killed driver redoes at most
the blocks that were in flight.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from gdino.apps.label import Journal, LabelError, Runner, detect_batch, read_entry
from gdino.inference.tiles import TileSettings
from gdino.processing.image import ImageError, ImageSettings, preprocess_image
from gdino.utils.progress import Progress

logger = logging.getLogger(__name__)

READ_BLOCK = 8  # image names per Ray Data block: one reading task, one actor task, one journal write
IN_FLIGHT_PER_ACTOR = 2  # batches queued on an actor: one running, one arriving
MAX_RESTARTS = 4  # an actor process that dies is started again this often (then the run stops)


class RayMissingError(LabelError):
    """``--ray`` without Ray installed."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how to run.

    Attributes:
        address: None starts a local Ray instance; "auto" joins the running cluster; else its address.
        model: hub id, directory or .pth, loaded by every actor.
        classes, box_threshold, nms_threshold: as ``gdino label``'s.
        batch_size: images per actor call.
        workers: actors; None: one per GPU in the cluster, else one per two CPUs.
        device: the actors' device; None: cuda when the cluster has GPUs.
        dtype: "fp32", "bf16" or "fp16".
        threads: torch CPU threads in each actor (``--threads``); None: one. An actor reserves half
            a CPU whatever the count, so that reading tasks fit beside it on a one-CPU node.
        tiles: tiled detection (``--tile``): the reading tasks then send each image at its own size
            (RGB), ``batch_size`` images a block, and the actors tile them as ``gdino label`` does.
    """

    address: str | None
    model: str
    classes: tuple[str, ...]
    box_threshold: float | None  # None: the model's default
    nms_threshold: float | None
    batch_size: int = 4
    workers: int | None = None
    device: str | None = None
    dtype: str = "fp32"
    threads: int | None = None
    tiles: TileSettings | None = None


def import_ray() -> Any:
    """``ray`` with Ray Data, or a clear error naming the extra to install."""
    try:
        import ray
        import ray.data  # Ray Data is the part we need
    except ImportError as e:
        raise RayMissingError(f"--ray needs Ray Data: pip install 'gdino[ray]' ({e})") from None
    return ray


def ray_runner(
    options: RayOptions, image_settings: ImageSettings, log: IO[str] | None = None, actor: type | None = None
) -> Runner:
    """A ``gdino.apps.label`` runner that detects on Ray and journals in this process.

    Args:
        options: the cluster, model and detection settings.
        image_settings: the model's resize settings, for the reading tasks.
        log: where notes go (stderr when None).
        actor: the actor class (``_Detector``; ``bench/label_ray.py`` times the pipeline with a
            simulated model through a subclass).
    """

    def run(root: Path, names: list[str], journal: Journal, progress: Progress) -> None:
        ray = import_ray()
        owned = not ray.is_initialized()  # a Python caller's own ray.init() is used as it is
        if owned:
            _connect(ray, options.address)
        ray.data.DataContext.get_current().enable_progress_bars = False  # gdino's own bar is on stderr
        try:
            records = _records(ray, _pipeline(ray, root, names, options, image_settings, log, actor or _Detector))
            _journal_stream(records, journal, progress, set(names))
        except LabelError:
            raise
        except Exception as e:  # a dead cluster, or a model no actor can load
            raise LabelError(
                f"the Ray run stopped ({type(e).__name__}: {_first_line(e)}); what was done is in "
                f"the journal, and the same command resumes from there"
            ) from e
        finally:
            if owned:
                ray.shutdown()

    return run


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:300] if text else repr(e)


def _connect(ray: Any, address: str | None) -> None:
    """``ray.init``: a new local instance when ``address`` is None, else the cluster there ("auto")."""
    if address is None:
        ray.init(include_dashboard=False, configure_logging=False)
    else:
        ray.init(address=address, configure_logging=False)


def _journal_stream(records: Iterator[dict[str, Any]], journal: Journal, progress: Progress, todo: set[str]) -> None:
    """Appends the streamed records to the journal, a batch at a time; each image once."""
    batch: list[dict[str, Any]] = []
    for record in records:
        name = record["image"]
        if name not in todo:  # a retried batch delivered twice: already journaled
            logger.warning("label: %s arrived twice; journaled once", name)
            continue
        todo.discard(name)
        batch.append(record)
        if record.get("last"):
            _add(journal, progress, batch)
            batch = []
    _add(journal, progress, batch)
    if todo:
        raise LabelError(f"{len(todo)} images came back from Ray without a record; the same command retries them")


def _add(journal: Journal, progress: Progress, batch: list[dict[str, Any]]) -> None:
    if batch:
        for record in batch:
            record.pop("last", None)
        journal.add(batch)
        progress.update(len(batch))


def _records(ray: Any, dataset: Any) -> Iterator[dict[str, Any]]:
    """The pipeline's records as they stream in; the last of each batch carries ``"last": True``."""
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        rows = [json.loads(text) for text in batch["record"]]
        if rows:
            rows[-1]["last"] = True
        yield from rows


# --------------------------------------------------------------------------- the pipeline


def _pipeline(
    ray: Any,
    root: Path,
    names: list[str],
    options: RayOptions,
    image_settings: ImageSettings,
    log: IO[str] | None,
    actor: type,
) -> Any:
    """names -> read + resize (CPU tasks) -> detect (actor pool): a lazy Ray dataset of records."""
    on_gpu = options.device is None or options.device.startswith("cuda")
    gpus = int(ray.cluster_resources().get("GPU", 0)) if on_gpu else 0
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = options.workers or (gpus if gpus else max(1, cpus // 2))
    actor_cpus, read_cpus = (1.0, 1.0) if gpus else (0.5, 0.5)
    print(
        f"label: Ray, {workers} model actor(s) on {gpus} GPU(s) and {cpus} CPU(s)",
        file=log if log is not None else sys.stderr,
        flush=True,
    )
    # whole images are large (a 6000x4000 photo is 72 MB of RGB): a block of one batch, not READ_BLOCK
    block = max(1, options.batch_size) if options.tiles is not None else max(READ_BLOCK, options.batch_size)
    dataset = ray.data.from_items([{"image": n} for n in names], override_num_blocks=max(1, -(-len(names) // block)))
    dataset = dataset.map_batches(
        _read_batch,
        fn_kwargs={"root": str(root), "settings": None if options.tiles is not None else image_settings},
        batch_size=None,
        batch_format="numpy",
        num_cpus=read_cpus,
        max_retries=3,
    )
    return dataset.map_batches(
        actor,
        fn_constructor_kwargs={"options": options, "gpu": bool(gpus), "threads": options.threads or 1},
        batch_size=max(1, options.batch_size),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=IN_FLIGHT_PER_ACTOR),
        num_cpus=actor_cpus,
        num_gpus=1 if gpus else 0,
        max_restarts=MAX_RESTARTS,
        max_task_retries=MAX_RESTARTS,
    )


def _read_batch(batch: dict[str, np.ndarray], root: str, settings: ImageSettings | None) -> dict[str, Any]:
    """A Ray CPU task: image names -> the images resized to the model's input size (at their own
    size, RGB, when ``settings`` is None: for tiles), or an error.

    Columns out: image, pixels (uint8 bytes, H*W*3), height, width (resized), original_width,
    original_height, error ("" when read).
    """
    out: dict[str, list[Any]] = {
        k: [] for k in ("image", "pixels", "height", "width", "original_width", "original_height", "error")
    }
    resize_only = None if settings is None else replace(settings, do_rescale=False, do_normalize=False)
    for name in batch["image"]:
        name = str(name)
        _, image, error = read_entry(Path(root), name)
        pixels = np.zeros((0, 0, 3), np.uint8)
        if image is not None:
            try:  # preprocess_image's own resize (float32 of whole numbers, exact as uint8)
                pixels = (
                    np.asarray(image)  # (H, W, 3) RGB: read_entry's load_image, as detect reads it
                    if resize_only is None
                    else preprocess_image(image, resize_only).transpose(1, 2, 0).astype(np.uint8)
                )
            except ImageError as e:  # what the single-process run records for it
                error = f"detection failed: {e!r}"
        out["image"].append(name)
        out["pixels"].append(pixels.tobytes())
        out["height"].append(pixels.shape[0])
        out["width"].append(pixels.shape[1])
        out["original_width"].append(image.width if image is not None else 0)
        out["original_height"].append(image.height if image is not None else 0)
        out["error"].append(error or "")
    return {
        k: np.array(v, dtype=object) if k in ("image", "pixels", "error") else np.array(v, dtype=np.int64)
        for k, v in out.items()
    }


@dataclass(frozen=True)
class _Resized:
    """An image resized to the model's input: ``width``/``height`` are the original's, for the record."""

    pixels: np.ndarray  # (H, W, 3) uint8, the resized image
    width: int
    height: int


class _Detector:
    """A Ray actor: loads the model once, then turns batches of resized images into records."""

    def __init__(self, options: RayOptions, gpu: bool, threads: int) -> None:
        import torch

        from gdino.apps.arguments import torch_dtype
        from gdino.inference.detector import GroundingDinoForObjectDetection

        torch.set_num_threads(threads)
        # Ray shows an actor only its own GPU: "cuda" is that one, whatever --device numbered
        device = "cuda" if gpu and torch.cuda.is_available() else (options.device or "cpu")
        self.model = GroundingDinoForObjectDetection.from_pretrained(
            options.model, device=device, dtype=torch_dtype(options.dtype)
        ).eval()
        self.model.phrases(list(options.classes))  # a bad class list fails here, before any image
        self.options = options
        self.normalise = replace(self.model.processor.image_settings, do_resize=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        loaded, failed = [], []
        for i, name in enumerate(batch["image"]):
            if batch["error"][i]:
                failed.append({"image": str(name), "error": str(batch["error"][i])})
                continue
            height, width = int(batch["height"][i]), int(batch["width"][i])
            pixels = np.frombuffer(batch["pixels"][i], np.uint8).reshape(height, width, 3)  # (H, W, 3)
            original = int(batch["original_width"][i]), int(batch["original_height"][i])
            loaded.append((str(name), _Resized(pixels, *original)))
        records = (detect_batch(self._detect, loaded) if loaded else []) + failed  # type: ignore[arg-type]
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}

    def _detect(self, images: list[_Resized]) -> list[Any]:
        """``model.detect`` on resized images: what ``encode_image`` does after its resize; with tiles,
        ``model.detect`` on the whole images, tiled as ``gdino label --tile`` tiles them."""
        import torch
        from PIL import Image

        o = self.options
        if o.tiles is not None:
            pictures = [Image.fromarray(image.pixels) for image in images]
            return self.model.detect(  # type: ignore[return-value]
                pictures, list(o.classes), o.box_threshold, nms_threshold=o.nms_threshold,
                tiles=o.tiles, batch_size=max(1, o.batch_size),
            )  # fmt: skip

        from gdino.inference.detector import EncodedImages
        from gdino.models.grounding_dino.model import stack_images

        features = []
        with torch.inference_mode():
            for image in images:  # one at a time, as encode_image: each image's features are its own
                normalised = preprocess_image(Image.fromarray(image.pixels), self.normalise)  # (3, H, W)
                pixels = torch.from_numpy(normalised)[None].to(self.model.device, self.model.dtype)  # (1, 3, H, W)
                features.append(self.model.image_features(pixels))
            encoded = EncodedImages(stack_images(features), [(i.width, i.height) for i in images], False)
        found = self.model.detect(encoded, list(o.classes), o.box_threshold, nms_threshold=o.nms_threshold)
        return found if isinstance(found, list) else [found]  # a list: ``encoded`` is a batch


def image_settings(model: str) -> ImageSettings:
    """The model's resize and normalisation settings, read as ``from_pretrained`` reads them."""
    from gdino.processing.processor import GroundingDinoProcessor

    return GroundingDinoProcessor.from_pretrained(model).image_settings
