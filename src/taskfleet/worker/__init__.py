"""Worker side: runs server tasks (SPEC 4) taken from the dispatch queue."""
