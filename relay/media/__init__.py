"""Media anchoring: SDP rewrite, port allocation, RTP/RTCP forwarding."""
