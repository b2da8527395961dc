"""Applications on top of the library: the command line, labelling, exports, drawing, the server."""
