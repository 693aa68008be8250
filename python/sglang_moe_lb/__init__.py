"""sglang-moe-lb: dispatch-time load balancing for MoE expert parallelism."""
