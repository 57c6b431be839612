"""The dataset build pipeline: recipe, readers, tokenization (tiktoken fast path proven equal to
HF), per-domain length upsampling, the `.bin/.idx` writer, stats and the `mu-build-dataset` CLI."""
