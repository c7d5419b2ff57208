"""One module per phase, numbered like the scripts; each exposes one plain function."""
