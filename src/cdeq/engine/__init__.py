"""The engine room: typed configuration, atomic checksummed files, the one training loop,
precision and devices, processes (torchrun), threads, progress and input checks.

Everything else in cdeq builds on these modules; they import nothing else of cdeq.
"""
