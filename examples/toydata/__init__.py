"""Demo and test assets (not part of the installed package): tiny Llama-3-style tokenizers trained
on the fly and synthetic multi-domain corpora. Nothing here downloads anything."""
