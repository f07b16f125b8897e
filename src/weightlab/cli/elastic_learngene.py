"""weightlab elastic commands of learngene (registered on cli.elastic's apps)."""
