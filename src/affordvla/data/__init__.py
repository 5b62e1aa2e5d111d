"""Dataset readers, writers and the common sample schema."""
