"""The model: ``nn.Module``s only, tensors in and tensors out, no IO, importing nothing of gdino but
``gdino.config``. ``grounding_dino.GroundingDino`` is the whole detector; ``transformer`` holds the
feature enhancer, query selection and decoder; ``ops`` the deformable attention kernels."""
