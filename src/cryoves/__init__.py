"""cryoves: find every vesicle in a cryo-electron tomogram as an exact sphere."""

__version__ = "0.1.0"

#: The model every command uses unless told otherwise: packaged with cryoves, works offline.
DEFAULT_MODEL = "cryoves-default"
