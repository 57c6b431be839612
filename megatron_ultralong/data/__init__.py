"""Long-context data: readers, tokenizer backends (tiktoken fast path), upsampling, .bin/.idx builder."""
