"""What talks to Redis, used by the publisher, the strategy library and the CLI alike:
the bus adapter (``bus``: clients for one server, Sentinel and Cluster, fenced writes,
the faults Redis raises), RESP on the wire (``resp``: building commands and reading
replies) and the asyncio helpers every process needs (``tasks``)."""
