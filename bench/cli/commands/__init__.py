"""One module per `bench` verb: HELP, add_arguments(parser), run(args) -> int."""
