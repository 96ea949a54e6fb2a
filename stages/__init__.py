"""Ray Data stages: read, decode, score, embed, prune, manifest, stream. One stage per module.

Every stage follows the contract in `stages/base.py` (name, input and output columns, map or all-to-all,
resources); a chain of stages is checked with `check_chain` when it is built. Stages import only
`pipeline.models` and `pipeline.core`.
"""
