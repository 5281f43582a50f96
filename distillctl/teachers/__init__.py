"""Teachers: the frozen network a student learns from (registry, download, conversion, loading)."""
