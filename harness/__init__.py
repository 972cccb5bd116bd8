"""Development harness: finds a real ComfyUI, builds tiny real models, drives its samplers.

Used by the tests, the demo and the benchmarks; not part of the published node pack.
"""
