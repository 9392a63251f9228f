"""Device targets: what runs an export on (emulated) phone hardware, how it is set up, and how it is measured."""
