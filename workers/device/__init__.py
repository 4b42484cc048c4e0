"""The device side: the pure batching core, the one loop that owns the device, the optional device process
that runs encoder passes out of reach of the receiving side's GIL, and the runtime that loads the models and
takes a request from validation to its result."""
