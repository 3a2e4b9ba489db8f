"""UDP: the flow table, the UDP proxy on loopback, and UDP services in the lab."""
