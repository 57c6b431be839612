"""The evaluation suite: NIAH, RULER and further benchmarks behind one interface (registry.py),
run resumably by one command (runner.py, `mu-eval-suite`)."""
