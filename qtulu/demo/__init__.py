"""`qtulu demo`: the embedded default (a tiny LLaMA built in-process, synthetic skills).
"""
