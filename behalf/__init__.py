"""behalf: the composition root — settings, wiring (deps), the CLI, `behalf dev` and its sandbox.

May import every other package; nothing imports it.
"""
