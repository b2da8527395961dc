"""Run by tests/integrations/test_fiftyone.py with .venv-fiftyone's Python (FiftyOne pins opencv < 5, so it
has its own venv; scripts/fiftyone_venv.sh makes it): FiftyOne's ``apply_model`` with ``GdinoModel`` on
the images of a folder, its labels written to a JSON file and its masks to a .npz.

    python fiftyone_apply.py IMAGES OUT.json OUT.npz [--masks]

The test sets FIFTYONE_DATABASE_DIR (a temp folder for the bundled MongoDB) and FIFTYONE_DO_NOT_TRACK.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the ellipse segmenter


def main(images: Path, out: Path, masks_out: Path, masks: bool) -> None:
    import fiftyone as fo

    from ellipse_segmenter import EllipseSegmenter
    from gdino.integrations.fiftyone import GdinoModel
    from gdino.training.shapes import pair_names

    dataset = fo.Dataset()
    dataset.add_samples([fo.Sample(filepath=str(p)) for p in sorted(images.glob("*.png"))])
    model = GdinoModel("gdino-shapes", labels=pair_names(), segmenter=EllipseSegmenter() if masks else None)
    batches: list[int] = []  # the images per predict_all call: FiftyOne's batching, seen from the model
    predict_all = model.predict_all
    model.predict_all = lambda args: batches.append(len(args)) or predict_all(args)
    dataset.apply_model(model, label_field="gdino", confidence_thresh=0.3, batch_size=4, skip_failures=False)
    rows, arrays = {}, {}
    for sample in dataset.iter_samples():
        found = sample["gdino"]
        assert isinstance(found, fo.Detections), type(found)
        rows[Path(sample.filepath).name] = [
            {"label": d.label, "bounding_box": list(d.bounding_box), "confidence": d.confidence}
            for d in found.detections
        ]
        for i, d in enumerate(found.detections):
            if d.mask is not None:
                arrays[f"{Path(sample.filepath).name}:{i}"] = np.asarray(d.mask)
    out.write_text(json.dumps({"rows": rows, "fiftyone": fo.__version__, "samples": len(dataset), "batches": batches}))
    np.savez(masks_out, **arrays)
    dataset.delete()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), "--masks" in sys.argv[4:])
