"""The `tandem` command: subcommands, the local cluster launcher, the router client."""
