"""The `mla-mnist` command line and benchmark harness (imports a framework only when asked for one)."""
