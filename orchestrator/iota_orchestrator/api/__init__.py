"""HTTP routes, one module per concept: runs, contributors, work (assignment, heartbeat), merge, blobs."""
