"""The node agent: sets up and keeps up one node's share of the Fan."""
