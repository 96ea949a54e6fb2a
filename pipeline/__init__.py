"""maskdiet: curate image data by difficulty and pretrain masked image models on it, on Ray."""

__version__ = "0.1.0"
