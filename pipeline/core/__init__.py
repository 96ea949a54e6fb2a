"""The bottom layer: config, storage, the Ray runtime, Ray private-API shims and the user-error type.

Imports nothing else of maskdiet."""
