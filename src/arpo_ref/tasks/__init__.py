"""Tasks: the worlds and datasets the agent is trained and evaluated on.

`toy_world` is the offline default of the CPU demo; adapters for standard benchmark files live
beside it.
"""
