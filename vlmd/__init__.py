"""vlmd: a vision-language model inference server."""

__version__ = "0.1.0"
