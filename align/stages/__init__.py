"""The stages: one module each, registered in align.stages.registry; they never import each other.

Shared machinery (the RunDir lifecycle, the training skeleton, sample tables) is in
align.stages.common. A stage module imports only light things at module level, so configs
load and fail before torch and TRL do.
"""
