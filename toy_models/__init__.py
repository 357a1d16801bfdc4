"""Toy `PreTrainedModel`s built only for this suite, and the cases built from them and from transformers' own
architectures.

Importing the package imports nothing: the catalogue (zoo.py, architectures.py) is read in the parent, which
needs no modeling code. `toy_models.register` registers the toy decoder with the Auto classes; every toy
case imports it (`Case.imports`) in the processes that load one.
"""
