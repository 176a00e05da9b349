"""How jaxad's programs are compiled and placed on devices: compile options, fixed-shape batching
(:mod:`~jaxad.runtime.compilation`), device meshes with their reductions
(:mod:`~jaxad.runtime.parallel`) and the processes of a multi-host run
(:mod:`~jaxad.runtime.distributed`). The lowest layer: it imports nothing else of jaxad's."""
