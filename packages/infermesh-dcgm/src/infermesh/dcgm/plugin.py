"""Plugin registration of infermesh-dcgm.

The dcgm adapters land in a later release (see the issue tracker); until then this distribution
registers nothing, so installing it is harmless and `infermesh plugins` lists it as loaded.
"""
