"""Model families, one folder each: ``nn.Module``s only, tensors in and tensors out, no IO.

``grounding_dino`` is the detector (its config, modules and ``ops`` kernels). A segmenter family
(SAM 2.1, SAM, SAM-HQ) goes beside it as ``models/sam2/`` and ``models/sam/``, each with its own
``config.py``; a model folder imports only itself and ``gdino.utils``."""
