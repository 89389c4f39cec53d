"""Benchmarks under the Tülu 3 evaluation protocols: python -m eval.{gsm8k,math,ifeval,builtin} --ckpt DIR."""
