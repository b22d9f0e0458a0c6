"""PBX phone-home: the PBX directory, digest authentication and the live registry."""
