"""tlengine's built-in plugins, registered as entry points of the tlengine distribution."""
