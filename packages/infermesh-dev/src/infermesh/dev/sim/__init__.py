"""Simulations that run InferMesh's real state machines on a simulated network in virtual time.

`infermesh sim gossip` drives `infermesh.agent.gossip.swim.Swim` for thousands of nodes in one
process; nothing here opens a socket or sleeps.
"""
