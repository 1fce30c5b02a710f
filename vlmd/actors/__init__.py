"""The actors: separate processes that exchange `vlmd.messages` over Unix sockets."""
