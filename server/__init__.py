"""The gateway in front of Triton, and the launcher of the local stack."""
