"""repsim: compare what neural networks learn, layer by layer, with CKA."""

__version__ = "0.1.0"
