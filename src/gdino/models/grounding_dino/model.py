"""Grounding DINO: image and text in, per-query class logits over text tokens and boxes out.

The forward is split in three so that callers can reuse work: ``text_features`` (BERT, depends
on the prompt only), ``image_features`` (Swin and the input projections, depends on the image
only) and ``detect_features`` (feature enhancer, query selection, decoder and heads).

Images of a padded batch are encoded one by one at their own size: Swin and the GroupNorm of the
input projections do not know about padding, so running them on a zero-padded batch (as the
reference does) makes an image's detections depend on the other images in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gdino.models.grounding_dino.bert import BertEncoder, phrase_masks
from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.models.grounding_dino.features import DenoisingQueries, ImageFeatures, TextFeatures, pad_levels, stack_images
from gdino.models.grounding_dino.heads import MLP, ClassHead, per_layer, predict_boxes
from gdino.models.grounding_dino.swin import SwinBackbone
from gdino.models.grounding_dino.transformer import Decoded, Transformer

__all__ = [
    "Decoded",
    "GroundingDino",
    "GroundingDinoOutput",
    "ImageFeatures",
    "TextFeatures",
    "Transformer",
    "stack_images",
]


@dataclass
class GroundingDinoOutput:
    """Model outputs, named and shaped as transformers' ``GroundingDinoObjectDetectionOutput``.

    Attributes:
        logits: (B, Q, max_text_len) similarity of each query to each text token;
            -inf on padding tokens and past the text.
        pred_boxes: (B, Q, 4) boxes as (cx, cy, w, h), normalised to each image's size.
        input_ids: (B, T) the token ids the logits refer to.
        query_index: (B, Q) the image token (position in the flattened feature levels)
            each query was selected from; pass it back as ``query_index`` to decode the same queries.
        decoder_logits, decoder_pred_boxes: (L, B, num_queries, max_text_len) and
            (L, B, num_queries, 4), every decoder layer's predictions (the last equals ``logits``
            and ``pred_boxes``); only with ``intermediate=True``.
        encoder_logits, encoder_pred_boxes: (B, num_queries, max_text_len) and
            (B, num_queries, 4), the selected proposals' logits and boxes before the decoder,
            not detached; only with ``intermediate=True``.
        denoise_logits, denoise_pred_boxes: (L, B, N, max_text_len) and (L, B, N, 4), every
            decoder layer's predictions for the denoising queries, when the forward had any.
        loss, loss_dict: the total loss and its named terms, when ``labels`` were given
            (``GroundingDinoForObjectDetection``).
    """

    logits: Tensor
    pred_boxes: Tensor
    input_ids: Tensor | None = None
    query_index: Tensor | None = None
    decoder_logits: Tensor | None = None
    decoder_pred_boxes: Tensor | None = None
    encoder_logits: Tensor | None = None
    encoder_pred_boxes: Tensor | None = None
    denoise_logits: Tensor | None = None
    denoise_pred_boxes: Tensor | None = None
    loss: Tensor | None = None
    loss_dict: dict[str, Tensor] | None = None

    def __getitem__(self, key: str) -> Tensor | None:
        return getattr(self, key)


class GroundingDino(nn.Module):
    """The detector. Parameter names follow the original checkpoint (see ``gdino.checkpoint.convert``).

    Args:
        config: the architecture.
        init_weights: draw the random embedding tables; loading a checkpoint passes False, as
            every tensor is about to be replaced (``gdino.models.grounding_dino.init``).
    """

    def __init__(self, config: GroundingDinoConfig, init_weights: bool = True) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.backbone = SwinBackbone(config.swin)
        self.bert = BertEncoder(config.text, init=init_weights)
        self.feat_map = nn.Linear(config.text.hidden_size, d)
        channels = list(config.swin.out_channels)
        projections = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d)) for c in channels]
        in_channels = channels[-1]
        for _ in range(config.num_feature_levels - len(channels)):
            projections.append(
                nn.Sequential(nn.Conv2d(in_channels, d, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, d))
            )
            in_channels = d
        self.input_proj = nn.ModuleList(projections)
        self.transformer = Transformer(config, init=init_weights)
        layers = config.decoder_layers
        # One module shared by every decoder layer, or a ModuleList of one per layer (see heads.per_layer).
        self.bbox_embed: nn.Module = (
            MLP(d, d, 4, 3) if config.share_box_heads else nn.ModuleList(MLP(d, d, 4, 3) for _ in range(layers))
        )
        scaled = config.contrastive_bias
        self.class_embed: nn.Module = (
            ClassHead(scaled) if config.share_class_heads else nn.ModuleList(ClassHead(scaled) for _ in range(layers))
        )

    def set_precision(self, dtype: torch.dtype) -> GroundingDino:
        """Runs Swin, BERT and the feature enhancer (nearly all the arithmetic) in ``dtype``.

        Query selection, the decoder and the heads stay in float32: they rank ~20k proposals
        whose scores nearly tie and refine boxes iteratively, and reduced precision there moves
        boxes and scores far more than it does anywhere else.
        """
        for part in (self.backbone, self.bert, self.feat_map, self.input_proj, self.transformer.encoder):
            part.to(dtype)
        return self

    # ------------------------------------------------------------------ text
    def text_features(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> TextFeatures:
        """Runs BERT with the phrase-blocked mask. ``input_ids`` (B, T) with T <= max_text_len."""
        if input_ids.shape[1] > self.config.max_text_len:
            raise ValueError(
                f"the prompt has {input_ids.shape[1]} tokens; the model takes at most {self.config.max_text_len}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        self_attention, position_ids = phrase_masks(input_ids, self.config.special_token_ids)
        hidden = self.bert(input_ids, self_attention, token_type_ids, position_ids)
        return TextFeatures(
            features=self.feat_map(hidden.to(_dtype(self.feat_map))),
            padding_mask=~attention_mask.bool(),
            self_attention=self_attention,
            position_ids=position_ids,
        )

    # ----------------------------------------------------------------- image
    def image_features(self, pixel_values: Tensor, pixel_mask: Tensor | None = None) -> ImageFeatures:
        """Swin and the input projections. ``pixel_values`` (B, 3, H, W); ``pixel_mask`` (B, H, W), 1 on the image."""
        pixel_values = pixel_values.to(_dtype(self.backbone))  # the processor gives float32
        if pixel_mask is None or bool(pixel_mask.all()):
            maps = self._project(self.backbone(pixel_values))
            masks = [torch.ones(m.shape[0], *m.shape[2:], dtype=torch.bool, device=m.device) for m in maps]
            return ImageFeatures(maps, masks)
        heights = pixel_mask[:, :, 0].sum(1).tolist()
        widths = pixel_mask[:, 0, :].sum(1).tolist()
        per_image = [
            self._project(self.backbone(pixel_values[i : i + 1, :, :h, :w]))
            for i, (h, w) in enumerate(zip(heights, widths))
        ]
        return pad_levels(per_image)

    def _project(self, stages: list[Tensor]) -> list[Tensor]:
        maps = [proj(x.to(_dtype(proj))) for proj, x in zip(self.input_proj, stages)]
        last = stages[-1]
        for proj in self.input_proj[len(stages) :]:
            last = proj(last.to(_dtype(proj)))
            maps.append(last)
        return maps

    # ------------------------------------------------------------- detection
    def detect_features(
        self, image: ImageFeatures, text: TextFeatures, query_index: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Feature enhancer, query selection, decoder and heads.

        ``query_index`` (B, Q) forces the selected image tokens (see ``Transformer.forward``).

        Returns:
            logits (B, Q, max_text_len), boxes (B, Q, 4) as cx, cy, w, h, and the selected image
            tokens (B, Q). Q is ``num_queries``, or fewer for images with fewer image tokens (see
            ``query_selection``); queries an image of a padded batch lacks have -inf logits and zero boxes.
        """
        decoded = self.decode(image, text, query_index)
        hidden, refs = decoded.hidden[-1], decoded.references[-1]
        last = self.config.decoder_layers - 1
        logits = self._class_heads()[last](hidden, decoded.memory_text, text.padding_mask, self.config.max_text_len)
        logits = _mask_padded(logits, decoded.padded, float("-inf"))  # queries on padding (see query_selection)
        boxes = self._refine(self._box_heads()[last], hidden, refs)
        return logits, _mask_padded(boxes, decoded.padded, 0.0), decoded.index

    def decode(
        self,
        image: ImageFeatures,
        text: TextFeatures,
        query_index: Tensor | None = None,
        denoise: DenoisingQueries | None = None,
    ) -> Decoded:
        """Feature enhancer, query selection and decoder, up to the heads (``Transformer``, see ``Decoded``)."""
        decoded: Decoded = self.transformer(image, text, self._box_heads(), query_index, denoise)
        return decoded

    def _box_heads(self) -> list[nn.Module]:
        return per_layer(self.bbox_embed, self.config.decoder_layers)

    def _class_heads(self) -> list[nn.Module]:
        return per_layer(self.class_embed, self.config.decoder_layers)

    def _refine(self, box_head: nn.Module, hidden: Tensor, references: Tensor) -> Tensor:
        """``box_head``'s refinement of ``references`` (..., 4) with the configured box logit."""
        config = self.config
        return predict_boxes(hidden, references, box_head, config.box_logit_eps, config.box_logit_original)

    def _layer_logits(self, hidden: Tensor, memory_text: Tensor, text_padding_mask: Tensor) -> Tensor:
        """(L, B, N, D) every layer's hidden states -> (L, B, N, max_text_len), each by its layer's class head."""
        width = self.config.max_text_len
        return torch.stack(
            [head(h, memory_text, text_padding_mask, width) for head, h in zip(self._class_heads(), hidden)]
        )

    def intermediate_outputs(self, decoded: Decoded, text_padding_mask: Tensor) -> dict[str, Tensor]:
        """Every decoder layer's logits and boxes, and the encoder proposals' (what the loss needs).

        The proposals' logits compare the selected tokens' normalised encoder output with the
        enhanced text, and their boxes keep the proposal head's graph, as the original repository
        (DINO's ``tgt_undetach``, ``refpoint_embed_undetach``) feeds its encoder loss, so that loss
        trains ``enc_output``, ``enc_output_norm`` and ``enc_out_bbox_embed``. transformers instead
        scores the learnt query embeddings against the text before the encoder and uses detached
        boxes, so its encoder loss trains none of them.
        """
        width = self.config.max_text_len
        layers = self._layer_logits(decoded.hidden, decoded.memory_text, text_padding_mask)  # (L, B, Q, W)
        extra: dict[str, Tensor] = {}
        if decoded.denoise_hidden is not None and decoded.denoise_references is not None:
            extra = {
                "denoise_logits": self._layer_logits(decoded.denoise_hidden, decoded.memory_text, text_padding_mask),
                "denoise_pred_boxes": self._refine(
                    self.bbox_embed, decoded.denoise_hidden, decoded.denoise_references
                ),  # (L, B, N, 4)
            }
        return {
            **extra,
            "decoder_logits": _mask_padded(layers, decoded.padded, float("-inf")),  # (L, B, Q, W)
            "decoder_pred_boxes": _mask_padded(
                self._refine(self.bbox_embed, decoded.hidden, decoded.references), decoded.padded, 0.0
            ),
            "encoder_logits": self.transformer.enc_out_class_embed(
                decoded.proposal_tokens, decoded.memory_text, text_padding_mask, width
            ),
            "encoder_pred_boxes": decoded.proposal_boxes,
        }

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        pixel_mask: Tensor | None = None,
        query_index: Tensor | None = None,
        intermediate: bool = False,
        denoise: DenoisingQueries | None = None,
    ) -> GroundingDinoOutput:
        """The whole detector on a processed batch (the processor's output can be passed as ``**inputs``).

        ``query_index`` (B, Q), e.g. another run's ``outputs.query_index``, decodes those
        image tokens instead of the best-scoring ones. ``intermediate`` also returns every decoder
        layer's predictions and the encoder proposals' (for the loss). Any other argument (a typo
        such as ``pixel_masks``, or transformers' ``output_attentions``, ``return_dict``, which this
        model does not implement, or ``labels``: the loss is computed by
        ``GroundingDinoForObjectDetection``) raises ``TypeError`` rather than being ignored.
        ``denoise`` (training) adds denoising queries, whose predictions come back in
        ``denoise_logits`` and ``denoise_pred_boxes`` (it implies ``intermediate``).
        """
        text = self.text_features(input_ids, attention_mask, token_type_ids)
        image = self.image_features(pixel_values, pixel_mask)
        if not intermediate and denoise is None:
            logits, boxes, index = self.detect_features(image, text, query_index)
            return GroundingDinoOutput(logits=logits, pred_boxes=boxes, input_ids=input_ids, query_index=index)
        return self.training_outputs(self.decode(image, text, query_index, denoise), text, input_ids)

    def training_outputs(self, decoded: Decoded, text: TextFeatures, input_ids: Tensor) -> GroundingDinoOutput:
        """``forward``'s outputs with every layer's predictions, from a ``decode`` of ``text``'s prompt."""
        extra = self.intermediate_outputs(decoded, text.padding_mask)
        return GroundingDinoOutput(
            logits=extra["decoder_logits"][-1],
            pred_boxes=extra["decoder_pred_boxes"][-1],
            input_ids=input_ids,
            query_index=decoded.index,
            decoder_logits=extra["decoder_logits"],
            decoder_pred_boxes=extra["decoder_pred_boxes"],
            encoder_logits=extra["encoder_logits"],
            encoder_pred_boxes=extra["encoder_pred_boxes"],
            denoise_logits=extra.get("denoise_logits"),
            denoise_pred_boxes=extra.get("denoise_pred_boxes"),
        )


def _mask_padded(x: Tensor, padded: Tensor | None, value: float) -> Tensor:
    """``x`` (..., B, Q, K) with ``value`` on the queries ``padded`` (B, Q) marks; ``x`` itself if None."""
    return x if padded is None else x.masked_fill(padded[..., None], value)


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
