"""Small shared helpers: files, caches, progress."""
