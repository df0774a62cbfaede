"""The `bench` command: `bench.cli.main.main(argv)` dispatches to one module per verb in
`bench.cli.commands` (parse, call one function, print)."""
