"""Grounding DINO: ``nn.Module``s only, tensors in and tensors out, no IO, importing nothing of gdino
outside this folder. ``config`` holds the architecture's settings, ``model.GroundingDino`` is the
whole detector, ``transformer`` the feature enhancer, query selection and decoder, ``swin`` and
``bert`` the two backbones, ``ops`` the deformable attention kernels."""
