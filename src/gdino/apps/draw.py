"""Drawing detections on images (kept apart from the results themselves)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gdino.inference.detections import Detections
from gdino.inference.masks import Masks

MASK_OPACITY = 0.45  # the fill over the object; its outline is opaque

_PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 190),
    (0, 128, 128),
]


def draw_detections(image: Image.Image, detections: Detections, width: int | None = None) -> Image.Image:
    """A copy of ``image`` with each box outlined and labelled "label 0.87", one colour per label;
    with masks, each mask filled translucent in its box's colour and outlined, under the boxes."""
    out = image.convert("RGB")
    line = width or max(2, round(min(out.size) / 250))
    if detections.masks is not None:
        out = draw_masks(out, detections.masks, [_colour(i) for i in detections.label_ids], max(1, line // 2))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(12, round(min(out.size) / 40)))
    found = zip(detections.boxes, detections.scores, detections.labels, detections.label_ids)
    for box, score, label, label_id in found:
        colour = _colour(label_id)
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        text = f"{label} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        lift = bottom - top + 2 * line
        y_text = y0 - lift if y0 - lift >= 0 else y0
        draw.rectangle((x0, y_text, x0 + right - left + 2 * line, y_text + lift), fill=colour)
        draw.text((x0 + line, y_text + line - (top - y0)), text, fill=(255, 255, 255), font=font)
    return out


def _colour(label_id: int | np.integer) -> tuple[int, int, int]:
    return _PALETTE[int(label_id) % len(_PALETTE)]


def draw_masks(image: Image.Image, masks: Masks, colours: list[tuple[int, int, int]], outline: int = 1) -> Image.Image:
    """A copy of RGB ``image`` with mask i filled at ``MASK_OPACITY`` in ``colours[i]`` and its
    boundary (``outline`` pixels wide, inside the mask) opaque; later masks are drawn over earlier ones."""
    pixels = np.array(image.convert("RGB"))  # (H, W, 3) uint8, a copy
    for crop, (x0, y0), colour in zip(masks.crops, masks.offsets, colours):
        if crop.size == 0:
            continue
        region = pixels[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]]  # (h, w, 3), a view
        blend = region[crop].astype(np.float32) * (1 - MASK_OPACITY) + np.asarray(colour, np.float32) * MASK_OPACITY
        region[crop] = blend.round().astype(np.uint8)
        region[crop & ~_eroded(crop, outline)] = colour
    return Image.fromarray(pixels, "RGB")


def _eroded(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` (h, w) bool less ``steps`` pixels of its border (4-neighbours; outside the crop is empty)."""
    for _ in range(steps):
        padded = np.pad(mask, 1)  # (h + 2, w + 2)
        mask = mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask
