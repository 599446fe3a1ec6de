"""The programs beside the library: build-pairs (with its LLM rewriter), convert, export, benchmark and its
report. They may use every layer; no library module imports them."""
