"""``SamProcessor``: transformers' ``SamProcessor`` for SAM and SAM-HQ (longest side resized, then padded).

```python
processor = SamProcessor.from_pretrained("facebook/sam-vit-base")
inputs = processor(images=image, input_points=[[[[450, 600]]]], return_tensors="pt")
masks = processor.post_process_masks(
    outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
)
```

Besides ``original_sizes`` it gives ``reshaped_input_sizes``, the (height, width) of each image
after resizing and before padding, which ``post_process_masks`` crops to. As in transformers, the
scaled prompts are float64 (the models cast them).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from gdino.processing.segment_processor import SegmentProcessor


class SamProcessor(SegmentProcessor):
    """SAM's (and SAM-HQ's) processor: ``pixel_values``, ``original_sizes``, ``reshaped_input_sizes``, prompts."""

    square: ClassVar[bool] = False
    coordinate_dtype: ClassVar[type[np.floating]] = np.float64
    model_input_names: ClassVar[tuple[str, ...]] = ("pixel_values", "original_sizes", "reshaped_input_sizes")

    def _sizes(self, originals: np.ndarray, resized: np.ndarray) -> dict[str, torch.Tensor]:
        return {"original_sizes": torch.from_numpy(originals), "reshaped_input_sizes": torch.from_numpy(resized)}
