"""Storage: the data directory, atomic durable writes, locks, the listing index and read state."""
