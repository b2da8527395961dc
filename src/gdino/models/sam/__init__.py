"""SAM and SAM-HQ: ``nn.Module``s only, tensors in and tensors out, no IO, importing nothing of gdino
outside this folder and ``gdino.utils``.

``config`` holds the architecture's settings (the ViT-B/L/H presets, reading a Hugging Face
``config.json``), ``image_encoder`` the ViT with windowed and global attention and its neck,
``prompt_encoder`` the points, boxes and mask input, ``transformer`` the two-way transformer,
``mask_decoder`` the masks and their IoU scores (and SAM-HQ's HQ token and feature fusion), and
``model.Sam`` puts the three together. Parameter names are the original repositories' (facebookresearch/
segment-anything, SysCV/sam-hq), so their checkpoints load as they are."""
