"""A real redis-server (and HAProxy) for the tests (filled in by the cluster work)."""
