"""Fine-tuning: data sets, captions, augmentation, synthetic shapes data, matcher and losses."""
