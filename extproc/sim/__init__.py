"""An OpenAI-compatible model simulator for the demo, the tests and the benchmarks."""
