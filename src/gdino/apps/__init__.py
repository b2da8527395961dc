"""Applications on top of the detector: the command line, labelling, exports, evaluation, the server."""
