"""The texts and records shared by data and models: sample schema, point names, task prompts, answer codecs.

The lowest layer of the package: data readers write these formats, backbones and heads read and generate them,
evaluation scores them. It imports nothing else of affordvla.
"""
