"""SAM 2.1's image model: ``nn.Module``s only, tensors in and tensors out, no IO, importing nothing of
gdino outside this folder and ``gdino.utils``.

``config`` holds the architecture's settings (the hiera-tiny, -small, -base+ and -large presets,
reading a Hugging Face ``config.json``), ``hiera`` the trunk (windowed and global attention blocks,
query pooling between stages, the windowed position embedding), ``image_encoder`` the FPN neck
over it,
``prompt_encoder`` the points, boxes and mask input, ``transformer`` the two-way transformer,
``mask_decoder`` the masks with the high-resolution feature path, the IoU and object-score heads,
and ``model.Sam2`` puts them together as the original image predictor runs them (no video memory;
the no-memory embedding added to the image embedding). Parameter names are the original
repository's (facebookresearch/sam2), so ``sam2.1_hiera_*.pt`` loads as it is."""
