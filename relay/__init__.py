"""pbx-relay: the SIP/RTP edge relay."""
