"""The operator CLI: `infermesh nodes|models|policy|events`, clients of an agent's Control API.

Pure parts (profiles, error translation, rendering, policy files) are kept apart from the thin
click and gRPC shells, so each can be tested without a network.
"""
