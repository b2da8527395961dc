"""The detection loss (``criterion``: focal, L1 and GIoU terms with transformers' keys) and the
Hungarian matching it is computed on (``matcher``; needs scipy, the ``train`` extra).

It works on ``GroundingDinoOutput`` tensors only, below the detector, which calls it when
``forward`` is given ``labels``; the training loop (``gdino.training``) sits above both.
"""
