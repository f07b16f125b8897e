"""weightlab elastic commands of d2nwg (registered on cli.elastic's apps)."""
