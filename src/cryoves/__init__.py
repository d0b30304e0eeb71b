"""cryoves: find every vesicle in a cryo-electron tomogram as an exact sphere."""

__version__ = "0.1.0"
