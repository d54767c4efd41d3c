"""The bottom layer every other package may import: errors, names and paths, hashing, atomic file writes."""
