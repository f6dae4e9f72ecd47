"""A real PostgreSQL server for the tests (filled in by the cluster work)."""
