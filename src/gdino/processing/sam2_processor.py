"""``Sam2Processor``: transformers' ``Sam2Processor`` without torchvision (images resized to the square input).

```python
processor = Sam2Processor.from_pretrained("facebook/sam2.1-hiera-tiny")
inputs = processor(images=image, input_boxes=[[[75, 275, 1725, 850]]], return_tensors="pt")
masks = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"])
```

Prompts are scaled by ``size / width`` in x and ``size / height`` in y (the image is resized to the
square without keeping its aspect ratio); see ``gdino.processing.sam_image`` for the pixels.
"""

from __future__ import annotations

from typing import ClassVar

from gdino.processing.segment_processor import SegmentProcessor


class Sam2Processor(SegmentProcessor):
    """SAM 2.1's processor: ``pixel_values``, ``original_sizes`` and the scaled prompts."""

    square: ClassVar[bool] = True
