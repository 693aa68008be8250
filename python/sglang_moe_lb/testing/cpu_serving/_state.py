"""Process-local flags of the CPU test harness (not inherited by spawned processes)."""

# Set by the launcher module in the launcher process, which resolves arguments and
# spawns the schedulers but never runs the model; the shims plugin skips its hooks there.
IN_LAUNCHER = False
