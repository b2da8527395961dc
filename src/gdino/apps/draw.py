"""Drawing detections on images (kept apart from the results themselves)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from gdino.inference.detections import Detections

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
    """A copy of ``image`` with each box outlined and labelled "label 0.87", one colour per label."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    line = width or max(2, round(min(out.size) / 250))
    font = ImageFont.load_default(size=max(12, round(min(out.size) / 40)))
    found = zip(detections.boxes, detections.scores, detections.labels, detections.label_ids)
    for box, score, label, label_id in found:
        colour = _PALETTE[int(label_id) % len(_PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        text = f"{label} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        lift = bottom - top + 2 * line
        y_text = y0 - lift if y0 - lift >= 0 else y0
        draw.rectangle((x0, y_text, x0 + right - left + 2 * line, y_text + lift), fill=colour)
        draw.text((x0 + line, y_text + line - (top - y0)), text, fill=(255, 255, 255), font=font)
    return out
