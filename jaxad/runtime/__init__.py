"""How jaxad's programs are compiled and placed on devices: compile options, fixed-shape batching
(:mod:`~jaxad.runtime.compilation`) and device meshes with their reductions
(:mod:`~jaxad.runtime.parallel`). The lowest layer: it imports nothing else of jaxad's."""
