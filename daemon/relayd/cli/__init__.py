"""Command-line entry points: relayd (the daemon) and relayctl (its control tool)."""
