"""Adapters that let other frameworks' and tools' pipelines run gdino, one module each (e.g. ``sahi``)."""
