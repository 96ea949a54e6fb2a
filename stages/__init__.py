"""Ray Data stages: read, decode, score, embed, prune, manifest, stream. One stage per module."""
