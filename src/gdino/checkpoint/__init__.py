"""Checkpoints: the pure key conversion between the Hugging Face layout, ours and the original
repository's (``convert``), strict loading (``loading``) and writing both layouts and a training
run's state (``saving``). Model names become files in ``gdino.utils.hub``."""
