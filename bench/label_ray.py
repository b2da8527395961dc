"""Throughput of ``gdino label --ray`` against the single-process run, and where it stops growing.

    python bench/label_ray.py real --images 16 --short-side 320   # one process, then Ray with 1 and 2 actors
    python bench/label_ray.py stages --images 24               # decode + resize per image, bytes sent
    python bench/label_ray.py simulate --images 96 --model-ms 50 --actors 1 2 4 8

``real`` labels the same folder with the small random-weight test model (tests/reference.py,
built once into the bench cache; transformers needed) in this process, then through a local Ray
instance (``ray.init``, as ``--ray`` alone) with 1 and 2 model actors. ``simulate`` keeps the real
reading tasks but replaces the model by an actor that sleeps ``--model-ms`` per image and
holds one logical GPU, to show how images/s grows with N actors until reading (decode and
resize) or the driver limits it. Times: ``wall`` from the call to the export (model loading and
Ray start included) and ``steady``, images/s between the first and last journaled batch.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("GDINO_BENCH_CACHE", Path.home() / ".cache" / "gdino-bench"))
CLASSES = ("cat", "remote control", "rocket")


def make_folder(count: int, size: tuple[int, int]) -> Path:
    """``count`` JPEGs of ``size`` (width, height) cut from the test images."""
    from PIL import Image

    root = Path(tempfile.mkdtemp(prefix="gdino-bench-ray-"))
    names = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")
    sources = [Image.open(ROOT / "tests" / "data" / n).convert("RGB").resize(size) for n in names]
    for i in range(count):
        sources[i % 4].rotate(i * 7).save(root / f"img{i:04d}.jpg", quality=90)
    return root


def small_model(short_side: int = 800) -> Path:
    """The small random-weight test model in the Hugging Face layout (cached), its processor set
    to resize images to ``short_side`` pixels (the published 800 by default; 1333 at most on the
    long side, scaled alike)."""
    directory = CACHE / "small-hf"
    if not (directory / "config.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        import torch

        from reference import build_reference, save_reference, small_reference_config

        with torch.no_grad():
            save_reference(build_reference(small_reference_config(), seed=1), directory)
    if short_side == 800:
        return directory
    resized = CACHE / f"small-hf-{short_side}"
    resized.mkdir(exist_ok=True)
    for f in directory.iterdir():
        target = resized / f.name
        if f.name in ("processor_config.json", "preprocessor_config.json"):
            config = json.loads(f.read_text())
            settings = config.get("image_processor", config)
            settings["size"] = {"shortest_edge": short_side, "longest_edge": short_side * 1333 // 800}
            target.write_text(json.dumps(config))
        elif not target.exists():
            target.symlink_to(f)
    return resized


def timed(run: Any, times: list[tuple[float, int]]) -> Any:
    """A ``gdino.apps.label`` runner that notes when each batch reaches the journal."""

    def wrapper(root: Path, names: list[str], journal: Any, progress: Any) -> None:
        add = journal.add
        journal.add = lambda records: (times.append((time.monotonic(), len(records))), add(records))
        run(root, names, journal, progress)

    return wrapper


def label(
    folder: Path, model: Path, workers: int | None, actor: type | None = None, batch_size: int = 2
) -> dict[str, float]:
    """One labelling run into a fresh OUT; ``workers`` None is the single-process run."""
    from gdino.apps.label import Settings, label_folder, local_runner
    from gdino.apps.label_ray import RayOptions, image_settings, ray_runner
    from gdino.inference.detector import GroundingDinoForObjectDetection

    settings = Settings(CLASSES, str(model), 0.3, None)
    times: list[tuple[float, int]] = []
    if workers is None:

        def make_detector() -> Any:
            net = GroundingDinoForObjectDetection.from_pretrained(model).eval()
            return lambda images: net.detect(images, list(CLASSES), 0.3)

        runner = local_runner(make_detector, batch_size)
    else:
        options = RayOptions(
            None, str(model), CLASSES, 0.3, None, batch_size, workers, "cpu" if actor is None else None
        )
        runner = ray_runner(options, image_settings(str(model)), log=io.StringIO(), actor=actor)
    out = Path(tempfile.mkdtemp(prefix="gdino-bench-out-")) / "out"
    start = time.monotonic()
    summary = label_folder(folder, out, "coco", settings, lambda: None, batch_size, io.StringIO(), timed(runner, times))
    wall = time.monotonic() - start
    steady = sum(n for _, n in times[1:]) / (times[-1][0] - times[0][0]) if len(times) > 1 else float("nan")
    return {
        "images": summary.images,
        "wall_s": round(wall, 1),
        "images_per_s_wall": round(summary.images / wall, 2),
        "images_per_s_steady": round(steady, 2),
        "export": (out / "annotations.json").read_bytes(),
    }


def real(args: argparse.Namespace) -> None:
    import ray

    folder, model = make_folder(args.images, args.size), small_model(args.short_side)
    rows = {"single process": label(folder, model, None)}
    for workers in (1, 2):
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)  # --ray alone
        ray.shutdown()  # started once to warm the file cache; each run starts its own (as --ray does)
        rows[f"ray, {workers} actor(s)"] = label(folder, model, workers)
    exports = {r.pop("export") for r in rows.values()}
    print(json.dumps({"same_export": len(exports) == 1, **rows}, indent=1))


def stages(args: argparse.Namespace) -> None:
    """Per image: decode + EXIF + RGB (``_read``), resize to the model's input, bytes sent to an actor."""
    from dataclasses import replace

    from gdino.apps.label import read_entry
    from gdino.apps.label_ray import image_settings
    from gdino.processing.image import preprocess_image

    folder = make_folder(args.images, args.size)
    resize = replace(image_settings(str(small_model(args.short_side))), do_rescale=False, do_normalize=False)
    decode = shrink = 0.0
    nbytes = 0
    for path in sorted(folder.iterdir()):
        t0 = time.perf_counter()
        _, image, _ = read_entry(folder, path.name)
        t1 = time.perf_counter()
        pixels = preprocess_image(image, resize)
        t2 = time.perf_counter()
        decode, shrink, nbytes = decode + t1 - t0, shrink + t2 - t1, nbytes + pixels.shape[1] * pixels.shape[2] * 3
    n = args.images
    print(
        json.dumps(
            {
                "decode_ms": round(1000 * decode / n, 1),
                "resize_ms": round(1000 * shrink / n, 1),
                "bytes_per_image": nbytes // n,
                "images_per_s_per_core": round(n / (decode + shrink), 1),
            }
        )
    )


def simulate(args: argparse.Namespace) -> None:
    import ray

    from gdino.apps.label_ray import _Detector

    class Simulated(_Detector):
        """No model: sleeps ``seconds`` per image, as a GPU would be busy; finds nothing."""

        seconds = args.model_ms / 1000

        def __init__(self, options: Any, gpu: bool, threads: int) -> None:
            self.options = options

        def _detect(self, images: list[Any]) -> list[Any]:
            time.sleep(self.seconds * len(images))
            return [Nothing() for _ in images]

    folder, model = make_folder(args.images, args.size), small_model()
    rows = {}
    for n in args.actors:
        # n logical GPUs, one per actor; logical CPUs for n actors and the reading tasks (2 real cores here)
        ray.init(num_cpus=n + 4, num_gpus=n, include_dashboard=False, configure_logging=False)
        try:  # the run uses this process's Ray instance, and its logical GPUs
            rows[f"{n} actor(s)"] = {
                k: v for k, v in label(folder, model, n, Simulated, args.batch_size).items() if k != "export"
            }
        finally:
            ray.shutdown()
    print(json.dumps({"model_ms": args.model_ms, "ideal_per_actor": round(1000 / args.model_ms, 1), **rows}, indent=1))


class Nothing:
    def to_list(self) -> list[Any]:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("real", "stages", "simulate"))
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=lambda s: tuple(map(int, s.split("x"))), default=(1024, 768), help="WxH")
    parser.add_argument("--short-side", type=int, default=800, help="the model's input size (short side)")
    parser.add_argument("--model-ms", type=float, default=50.0, help="simulate: model time per image")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    {"real": real, "stages": stages, "simulate": simulate}[args.what](args)


if __name__ == "__main__":
    main()
