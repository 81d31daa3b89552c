"""The gateway in front of Triton: HTTP in, Triton over gRPC or HTTP, Prometheus metrics out."""
