"""The `cepe` command line: thin click commands that resolve a config and call `pipeline`."""
