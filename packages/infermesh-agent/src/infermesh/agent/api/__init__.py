"""The agent's network APIs: gRPC Scoring and State servicers and the server that hosts them."""
