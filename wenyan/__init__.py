"""wenyan-mt's library: what stages and tools share (no main(), no argparse)."""
