"""Who is calling (identity sources), which tier they are in, and which models they may use."""
