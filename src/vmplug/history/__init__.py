"""History: the SQLite journal of what happened (store) and the figures drawn from it (health)."""
