"""Export: every settled charge as a record, in a Redis Stream, to files and CloudEvents receivers."""
