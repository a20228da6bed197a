# Vendored for tests only: three files of arcee-ai/DistillKit's `distillkit/compression/` (Apache License 2.0,
# Copyright Arcee AI), unmodified, from commit a61c2e7d25c2e990d45832e12bd8542bdee9c810: bitpack.py, config.py and
# monotonic_logprobs.py, the code DistillKit itself runs to compress and decompress captured log-probabilities.
# They need torch and pydantic, nothing else. The upstream package __init__ (which imports trainers, vLLM
# samplers, ...) is not vendored: these two files replace it.
