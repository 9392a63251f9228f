"""The application layer: CLI, demo, frontier, benchmarks and reports, above the library
(``hydraopt_mobile``), the suite (``hydraopt_mobile.suite``) and the exporters (``exporters``)."""
