"""Usage extraction from response bodies, one extractor per API schema."""
