"""Tests of the chained CNI plugin (in-process over the dispatcher, and the built binary as kubelet runs it)."""
