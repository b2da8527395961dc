"""Fine-tuning: data sets, captions, augmentation, synthetic shapes data and the training loop
(``trainer``). The loss and its Hungarian matching are ``gdino.loss``, below the detector:
``GroundingDinoForObjectDetection.forward`` calls it when it is given ``labels``. Matching needs
scipy (the ``train`` extra).
"""
