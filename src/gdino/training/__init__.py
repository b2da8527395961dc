"""Fine-tuning: data sets, captions, augmentation, synthetic shapes data, matcher and losses.

Imports the model layer, never the other way round: ``GroundingDinoForObjectDetection.forward``
calls ``gdino.training.loss`` only when it is given ``labels``. Matching needs scipy (the
``train`` extra).
"""
