"""Routing decisions of the relay (sans-I/O): PBX lookup, Path/Record-Route/Via, flow tokens, transactions."""
