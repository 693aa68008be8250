"""TEST AND DEMO ONLY: process-local flags of the CPU serving harness (not inherited by spawned processes)."""

# Set by the launcher module in the launcher process, which resolves arguments and
# spawns the schedulers but never runs the model; the shims plugin skips its hooks there.
IN_LAUNCHER = False
