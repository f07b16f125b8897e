"""weightlab elastic commands of bignas (registered on cli.elastic's apps)."""
