"""Process-level helpers: devices, the CPU allocator, logging."""
