"""The `fleet` command (main), its serving commands (serving) and shell completion. `fleet --help` imports none of torch, Ray, MLflow, pyarrow: subcommands import their modules on first use."""
