"""Fine-tuning: data sets, captions, augmentation, synthetic shapes data, Hungarian matching and
the detection loss (``matcher``, ``loss``), and the training loop (``trainer``).

Imports the model layer, never the other way round: ``GroundingDinoForObjectDetection.forward``
calls ``gdino.training.loss`` only when it is given ``labels``. Matching needs scipy (the
``train`` extra).
"""
