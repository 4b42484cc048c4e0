"""Supervision: starting a worker process (main), the launcher that keeps one per GPU (or N on a CPU)
running, and the embedded Redis the demo starts when none answers."""
