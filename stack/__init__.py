"""The local stack: the real Triton server and the gateway, started, supervised and stopped on this host."""
