"""The published checkpoints of the Grounding DINO family that gdino runs, with what is known of
each: its architecture (a ``GroundingDinoConfig`` preset, for the parameter count), licence, the
zero-shot figures its authors publish, and what gdino's implementation was checked against.

Every entry is a hub id that ``from_pretrained`` and ``--model`` take as it is; the list is for
choosing one (``gdino models``), not a restriction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.models.grounding_dino.model import GroundingDino

FAMILY_TEST = "tests/inference/test_family.py"
TINY_TEST = "tests/inference/test_parity.py"


@dataclass(frozen=True)
class KnownModel:
    """A published checkpoint.

    Attributes:
        name: the hub id.
        family: "Grounding DINO", "MM-Grounding-DINO" or "LLMDet".
        backbone: the Swin size.
        preset: its architecture.
        licence: as its model card states.
        figures: its authors' zero-shot results (e.g. "COCO 48.4, LVIS minival 28.8"), or "" if we quote none.
        checked: what gdino's outputs were compared with (random weights in this architecture).
    """

    name: str
    family: str
    backbone: str
    preset: Callable[[], GroundingDinoConfig]
    licence: str
    figures: str
    checked: str

    def parameters(self) -> int:
        """The architecture's parameter count (built on the meta device: no memory, no weights)."""
        with torch.device("meta"):
            return sum(p.numel() for p in GroundingDino(self.preset(), init_weights=False).parameters())


def _mm(size: str) -> Callable[[], GroundingDinoConfig]:
    return lambda: GroundingDinoConfig.mm(size)


_GD = "transformers' GroundingDinoForObjectDetection"
_MM = "transformers' MMGroundingDinoForObjectDetection"
_MMGD = "openmmlab-community/mm_grounding_dino_"

KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel(
        "IDEA-Research/grounding-dino-tiny",
        "Grounding DINO",
        "Swin-T",
        GroundingDinoConfig.tiny,
        "Apache-2.0",
        "COCO 48.4, LVIS minival 28.8",
        f"{_GD}, full size, both layouts ({TINY_TEST})",
    ),
    KnownModel(
        "IDEA-Research/grounding-dino-base",
        "Grounding DINO",
        "Swin-B",
        GroundingDinoConfig.base,
        "Apache-2.0",
        "",
        f"{_GD}, full size ({FAMILY_TEST}); the original .pth layout alike",
    ),
    *(
        KnownModel(
            _MMGD + suffix,
            "MM-Grounding-DINO",
            backbone,
            _mm(size),
            "Apache-2.0",
            figures,
            f"{_MM}, full size tiny and Swin-L five-level ({FAMILY_TEST})",
        )
        for suffix, backbone, size, figures in (
            ("tiny_o365v1_goldg", "Swin-T", "tiny", ""),
            ("tiny_o365v1_goldg_grit", "Swin-T", "tiny", ""),
            ("tiny_o365v1_goldg_v3det", "Swin-T", "tiny", ""),
            ("tiny_o365v1_goldg_grit_v3det", "Swin-T", "tiny", "COCO 50.6, LVIS minival 41.4"),
            ("base_o365v1_goldg_v3det", "Swin-B", "base", ""),
            ("base_all", "Swin-B", "base", ""),
            ("large_o365v2_oiv6_goldg", "Swin-L", "large", ""),
            ("large_all", "Swin-L", "large", ""),
        )
    ),
    *(
        KnownModel(
            f"iSEE-Laboratory/llmdet_{size}",
            "LLMDet",
            backbone,
            _mm(size),
            "Apache-2.0",
            f"LVIS minival {lvis}",
            f"{_MM}, full size tiny and Swin-L five-level ({FAMILY_TEST})",
        )
        for size, backbone, lvis in (
            ("tiny", "Swin-T", "44.7"),
            ("base", "Swin-B", "48.3"),
            ("large", "Swin-L", "51.1"),
        )
    ),
)


def known_model(name: str) -> KnownModel | None:
    """The entry of a hub id, if it is one of ``KNOWN_MODELS``."""
    return next((m for m in KNOWN_MODELS if m.name == name), None)
