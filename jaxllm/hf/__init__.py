"""Hugging Face interop: checkpoints and tokenizers in and out of jaxllm run folders."""
