"""Versioned SQL migrations, applied in order by ``waitroom migrate``."""
