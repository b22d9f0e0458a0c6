"""UDP, TCP and TLS listeners and flows (trio)."""
