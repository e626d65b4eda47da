"""The registered quantizer methods, one line each: the one place a new method is added (docs/extending.md).

Config names (`QuantSpec.estimator`) map to these objects through `qjax.registry`.
"""

from qjax import dorefa, dsq, methods, qdrop, registry

registry.register(methods.STE)
registry.register(methods.CLIPPED_STE)
registry.register(methods.LSQ_METHOD)
registry.register(methods.LSQ_PLUS)
registry.register(methods.PACT_METHOD)
registry.register(methods.EWGS)
registry.register(dsq.DSQ('dsq'))
registry.register(dorefa.DoReFa('dorefa'))
registry.register(qdrop.QDrop('qdrop'))
