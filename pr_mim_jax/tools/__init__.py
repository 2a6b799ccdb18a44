"""Tools: benchmarks, the compile report, the gradient study, mask pictures and the
small-scale study."""
